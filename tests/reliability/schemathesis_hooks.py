"""Schemathesis hooks for chat_web: loaded by schemathesis.toml beside this file."""

import schemathesis

# The refusals of schema-valid requests that JSON Schema cannot express (sums, role order, token counts, the set of
# served models, body bytes); each one has its own `code` in the error body.
DOCUMENTED_REFUSALS = {
    400: {"conversation_too_long", "message_too_long", "invalid_roles", "context_length_exceeded"},
    404: {"model_not_found"},
    413: {"body_too_large"},
}


@schemathesis.check
def schema_valid_requests_are_served(ctx, response, case):
    """A request that the schema allows gets 2xx, or one of the documented refusals."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code < 400:
        return None
    code = response.json()["error"]["code"] if response.status_code in DOCUMENTED_REFUSALS else None
    if code not in DOCUMENTED_REFUSALS.get(response.status_code, ()):
        raise AssertionError(f"a schema-valid request got {response.status_code} {response.text[:500]}")
    return None

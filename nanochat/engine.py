"""
Inference engine: batched sampling with a KV cache, and the calculator tool.

Everything is token ids in, token ids out. The engine uses only the model interface
(`make_kv_cache`, `forward(ids, kv_cache=...)` to prefill, `decode(ids, kv_cache)` for each new token,
`config.sequence_len`, `get_device`), so the
same code serves every model type.

Decoding is prefill + decode: the prompt is run once with batch size 1 (or several prompts of the same length
together, generate_many: evaluation and RL decode many problems at once), then the cache is expanded to
`num_samples` rows per prompt and each step feeds one token per row. Each row has a little state machine for
tool use: when the model writes <|python_start|> expr <|python_end|>, the engine evaluates expr with a safe
calculator and forces <|output_start|> result <|output_end|> into that row, as if the tool had answered.
"""

import ast
import operator
import time
import warnings
from collections import deque

import torch

from nanochat.models.base import sample_next_token

# -----------------------------------------------------------------------------
# Calculator tool: a tiny arithmetic evaluator on Python's ast, never eval().

_BINARY_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPR_CHARS = 1000  # longer "expressions" are not arithmetic a model writes in one tool call
MAX_EXPONENT = 1000  # bounds the cost of a single **
MAX_INT_BITS = 4096  # ~1200 decimal digits: keeps every intermediate (and str(result)) cheap


class _Refused(Exception):
    pass


def _eval_node(node, deadline):
    # The deadline is checked at every node, so the limit holds on any thread (signals only work on the main one).
    if time.monotonic() > deadline:
        raise _Refused("time limit")
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, deadline)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _check_size(_UNARY_OPS[type(node.op)](_number(node.operand, deadline)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _number(node.left, deadline), _number(node.right, deadline)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise _Refused("exponent too large")
        return _check_size(_BINARY_OPS[type(node.op)](left, right))
    # the one method allowed: "strawberry".count("r") (letter counting is a classic small-model tool call)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and _is_str(node.func.value) and len(node.args) == 1 and _is_str(node.args[0]) and not node.keywords):
        return node.func.value.value.count(node.args[0].value)
    raise _Refused(f"{type(node).__name__} is not allowed")


def _is_str(node):
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _number(node, deadline):
    value = _eval_node(node, deadline)
    if type(value) not in (int, float):
        raise _Refused("not a number")
    return value


def _check_size(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Refused("number too large")
    if isinstance(value, complex):  # e.g. (-8) ** 0.5
        raise _Refused("complex result")
    return value


def use_calculator(expr, max_time=1.0):
    """Evaluate an arithmetic expression: numbers, + - * / // % ** (bounded), unary +/-, parentheses, and
    "string".count("s"). Returns the value, or None when the expression is refused, fails or takes too long."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return None
    if "'" not in expr and '"' not in expr:
        expr = expr.replace(",", "")  # thousands separators: "1,234 * 2"
    deadline = time.monotonic() + max_time
    try:
        with warnings.catch_warnings():  # e.g. "invalid decimal literal" for 3x: a refusal, not a warning to print
            warnings.simplefilter("ignore")
            tree = ast.parse(expr.strip(), mode="eval")
        return _eval_node(tree, deadline)
    except (_Refused, SyntaxError, ArithmeticError, ValueError, TypeError, RecursionError, MemoryError):
        return None


# -----------------------------------------------------------------------------
# Engine


def same_length_groups(prompts, max_group):
    """Indices of `prompts` in groups of at most max_group prompts of one length, for Engine.generate_many (which
    needs no padding then): shortest prompts first, each group in the prompts' order."""
    by_length = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    return [ids[j:j + max_group] for _, ids in sorted(by_length.items()) for j in range(0, len(ids), max_group)]


class RowState:
    """One sample's progress: its tokens, tokens waiting to be forced (tool output), and the tool-call state."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.forced = deque()
        self.in_python = False
        self.python_tokens = []
        self.completed = False


class Engine:

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer  # needed for tool use (decode the call, encode the result)

    def _special(self, name):
        return self.tokenizer.encode_special(name)

    def _advance_row(self, state, token):
        """Record `token` in a row; on <|python_end|>, queue the calculator's answer to be forced next."""
        state.tokens.append(token)
        if token in (self._special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()):
            state.completed = True
        if token == self._special("<|python_start|>"):
            state.in_python, state.python_tokens = True, []
        elif token == self._special("<|python_end|>") and state.in_python:
            state.in_python = False
            result = use_calculator(self.tokenizer.decode(state.python_tokens)) if state.python_tokens else None
            if result is not None:
                state.forced.append(self._special("<|output_start|>"))
                state.forced.extend(self.tokenizer.encode(str(result)))
                state.forced.append(self._special("<|output_end|>"))
            state.python_tokens = []
        elif state.in_python:
            state.python_tokens.append(token)

    def generate(self, tokens, num_samples=1, **kwargs):
        """Yield (token_column, token_masks) per step: one token per sample, mask 1 if sampled, 0 if forced by the
        tool. A row that ends (<|assistant_end|> or <|bos|>) keeps receiving tokens until all rows end; callers
        ignore what follows a row's end. Stops when every row ended, after max_tokens steps, or when the
        context is full. kwargs: max_tokens, temperature, top_k, top_p, seed."""
        yield from self.generate_many([tokens], num_samples, **kwargs)

    @torch.inference_mode()
    def generate_many(self, prompts, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None,
                      seed=42):
        """generate() for several prompts of the same length at once: one prefill of all of them, then
        num_samples rows per prompt, grouped by prompt (row p * num_samples + s). Batching changes the order of
        float sums inside the GEMMs, so a row's logits may differ from a lone run's in the last bits."""
        if not (isinstance(prompts, list) and prompts and all(isinstance(t, list) and t and
                                                               all(isinstance(i, int) for i in t) for t in prompts)):
            raise ValueError("tokens must be a non-empty list of ints (a prompt of token ids)")
        if len({len(t) for t in prompts}) > 1:
            raise ValueError(f"prompts decoded together must have the same length, got lengths "
                             f"{sorted({len(t) for t in prompts})}")
        tokens = prompts[0]
        context = self.model.config.sequence_len
        if len(tokens) > context:
            raise ValueError(f"prompt has {len(tokens)} tokens but the model's context is {context}; shorten it")
        device = self.model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        # 1) prefill the prompts once; the cache holds them plus what we will feed back
        capacity = context if max_tokens is None else min(context, len(tokens) + max_tokens)
        cache = self.model.make_kv_cache(len(prompts), capacity, device=device)
        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        # a model's vocab may be padded beyond the tokenizer's: never sample an id that cannot be decoded
        vocab_size = self.tokenizer.get_vocab_size()
        logits = self.model(ids, kv_cache=cache)[:, -1, :vocab_size]
        # 2) num_samples cache rows per prompt; every row samples its own first token
        cache.expand(len(prompts) * num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        rows = [RowState(t) for t in prompts for _ in range(num_samples)]

        num_generated = 0
        while True:
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)[:, 0].tolist()
            column, masks = [], []
            for state, token in zip(rows, sampled):
                forced = len(state.forced) > 0
                token = state.forced.popleft() if forced else token
                column.append(token)
                masks.append(0 if forced else 1)
                self._advance_row(state, token)
            yield column, masks
            num_generated += 1
            if all(state.completed for state in rows):
                break
            if max_tokens is not None and num_generated >= max_tokens:
                break
            if cache.pos >= capacity:  # the next token has no slot in the cache (or the rotary table)
                break
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)
            logits = self.model.decode(ids, cache)[:, :vocab_size]

    def generate_batch(self, tokens, num_samples=1, keep_end=False, **kwargs):
        """Non-streaming: returns (results, masks), per sample the prompt plus the generated tokens and the matching
        masks (0 for prompt and forced tokens). The ending <|assistant_end|> / <|bos|> is left out, unless keep_end
        (RL learns to stop from it)."""
        return self.generate_batch_group([tokens], num_samples, keep_end, **kwargs)

    def generate_batch_group(self, prompts, num_samples=1, keep_end=False, **kwargs):
        """generate_batch() for several prompts of the same length, decoded together: results and masks of
        len(prompts) * num_samples rows, grouped by prompt."""
        ends = (self._special("<|assistant_end|>"), self.tokenizer.get_bos_token_id())
        results = [list(t) for t in prompts for _ in range(num_samples)]
        masks = [[0] * len(t) for t in results]
        done = [False] * len(results)
        for column, column_masks in self.generate_many(prompts, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in ends:
                    done[i] = True
                if token not in ends or keep_end:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks

    def generate_batch_many(self, prompts, num_samples=1, keep_end=False, max_prompts=8, seeds=None, **kwargs):
        """generate_batch() for prompts of any lengths (an evaluation's or an RL step's problems): those of one
        length are decoded together, at most max_prompts at a time (max_prompts * num_samples rows), each group
        sampling with the seed of its first prompt (seeds[i], default i). Yields (i, results, masks) for every
        prompt i, group by group as they finish, shortest prompts first."""
        seeds = range(len(prompts)) if seeds is None else seeds
        k = num_samples
        for group in same_length_groups(prompts, max_prompts):
            results, masks = self.generate_batch_group([prompts[i] for i in group], k, keep_end,
                                                       seed=seeds[group[0]], **kwargs)
            for g, i in enumerate(group):
                yield i, results[g * k:(g + 1) * k], masks[g * k:(g + 1) * k]

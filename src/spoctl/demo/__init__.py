"""The built-in demo: a synthetic assistant task with exact rule-based ground truth, a tiny base model trained on
it, and the end-to-end run (`spoctl demo`, or `spoctl align` with no data and no model).

- `task`:  the task itself (prompts, responses, the rules, preference pairs and SFT data);
- `model`: the tiny base model (tokenizer + Llama), trained deterministically and cached;
- `score`: rule-judged scores of a model's greedy answers on held-out demo prompts;
- `run`:   prepare + align on the demo, marking the run as a demo in its manifest.
"""

from .task import DEMO_DIMS, rule_score

__all__ = ["DEMO_DIMS", "rule_score"]

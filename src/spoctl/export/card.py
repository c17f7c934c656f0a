"""The model card (README.md): Hugging Face YAML metadata, then what the model is and how it was made.

Built with huggingface_hub's `ModelCard` / `ModelCardData`, so the metadata is what the Hub reads. Models and data
are named portably (see provenance.py): Hub ids, or file names with their hashes -- never local paths.
"""

from __future__ import annotations

import json
from typing import Any

from .check import CheckResult
from .provenance import model_name, source_entry
from .stage import ExportSource


def render_card(src: ExportSource, *, kind: str, dtype: str, base_id: str | None, check: CheckResult,
                earlier: list[str], eval_report: dict[str, Any] | None, sources: dict[str, Any]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    st_all = src.manifest["stages"]
    tags = ["spoctl", "spo", "dpo", "alignment", "preference-optimization", *(["lora"] if src.lora else [])]
    entries = {d: source_entry(i) for d, i in sources.items()}
    # The Hub links only Hub ids; local models and files are named in the text below.
    hub_data = sorted({e["hub_id"] for e in entries.values() if e and e["hub_id"]})
    data = ModelCardData(base_model=base_id, library_name="peft" if kind == "adapter" else "transformers",
                         pipeline_tag="text-generation", tags=tags, datasets=hub_data or None)
    base_name = model_name(src.base_spec, base_id)
    fingerprint = src.manifest.get("base_fingerprint")
    base_line = f"- **Base model:** `{base_name}`" + ("" if base_id else (
        " (a local model" + (f"; weights fingerprint `{fingerprint[:16]}`" if fingerprint else "") + ")"))
    title = f"{base_name.split('/')[-1].removesuffix('.gguf')} aligned with SPO: " + " → ".join(src.dims)
    lines: list[str] = []
    lines += [f"# {title}", ""]
    lines += [
        f"This model is **stage {src.index} of {len(st_all)}** of a Sequential Preference Optimization (SPO) run made "
        "with spoctl: starting from the base model, it was aligned to one preference "
        "dimension after another, each stage keeping the earlier dimensions' preferences in its objective.", "",
        base_line,
        f"- **Dimension order:** {' → '.join(f'`{d}`' for d in src.dims)}"
        + (f" (the run continues with {', '.join('`' + s['dim'] + '`' for s in st_all[src.index:])}, not included)"
           if src.index < len(st_all) else ""),
        f"- **Training:** {'LoRA adapters' if src.lora else 'full fine-tuning'}, SPO mode "
        f"`{src.manifest.get('mode')}`",
        "- **Weights in this folder:** " + ("PEFT LoRA adapters (see *Loading*)" if kind == "adapter"
                                              else f"merged, `{dtype}`, safetensors"), "",
        "## Stages", "",
        "| stage | dimension | beta | weights of earlier dimensions | train pairs | eval pairs | steps |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for st in src.stages:
        plan = st.get("plan") or {}
        w = ", ".join(f"{d}: {v:g}" for d, v in (st.get("weights") or {}).items()) or "—"
        pairs = st.get("pairs") or {}
        steps = plan.get("max_steps") or f"epochs: {plan.get('epochs', '?')}"
        lines.append(f"| {st['index']} | {st['dim']} | {plan.get('beta', '?')} | {w} | {pairs.get('train', '?')} | "
                     f"{pairs.get('eval', '?')} | {steps} |")
    lines += ["", "## Data", "", "| dimension | source | source sha256 | format | train pairs | eval pairs |",
              "| --- | --- | --- | --- | --- | --- |"]
    for st in src.stages:
        info, entry, pairs = sources.get(st["dim"]), entries.get(st["dim"]), st.get("pairs") or {}
        if info and entry:
            c = info.get("counts") or {}
            digest = f"`{entry['sha256'][:16]}…`" if entry.get("sha256") else "—"
            lines.append(f"| {st['dim']} | `{entry['name']}` | {digest} | {info.get('format', '?')} | "
                         f"{c.get('train', pairs.get('train', '?'))} | {c.get('eval', pairs.get('eval', '?'))} |")
        else:
            lines.append(f"| {st['dim']} | unknown (prepared data no longer available) | — | unknown | "
                         f"{pairs.get('train', 'unknown')} | {pairs.get('eval', 'unknown')} |")
    lines += ["", "Full hashes -- of each source, and of the token ids of each prepared split -- are in "
              "`spoctl_lineage.json`.", ""]
    lines += _scorecard(eval_report)
    lines += _loading(kind, base_id, base_name, earlier)
    lines += ["## Lineage and verification", "",
              "`spoctl_lineage.json` records the run, the data hashes, each stage's settings and weight fingerprint, "
              "the sha256 of the model files this export was built from (`inputs`), and the sha256 of every file in "
              "this folder.", "",
              f"Before this folder was written, its model scored {check.pairs} held-out pairs ({check.source}) like "
              f"the training checkpoint: largest difference in summed log-probs {check.max_abs_diff:.3g} "
              f"(tolerance {check.rtol:g} relative + {check.atol:g})"
              + (f"; drift from the float32 checkpoint {check.drift_per_token:.3g} nats/token "
                 f"(limit {check.drift_limit:g})" if check.drift_per_token is not None else "") + ".", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _loading(kind: str, base_id: str | None, base_name: str, earlier: list[str]) -> list[str]:
    if kind == "merged":
        return ["## Loading", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'tok = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
                'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
                'ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,'
                ' return_tensors="pt", return_dict=True)',
                "print(tok.decode(model.generate(**ids, max_new_tokens=64)[0]))", "```", ""]
    code = ["## Loading", ""]
    if earlier:
        code += [f"The adapter at the root of this folder was trained on the base model **with the earlier stages' "
                 f"adapters merged into it**, in order: {', '.join(f'`{e}`' for e in earlier)}. Its "
                 "`adapter_config.json` therefore names no base model: applied to the bare base model it would give a "
                 "model that was never trained. Rebuild it like this:", ""]
    load_base = (f'model = AutoModelForCausalLM.from_pretrained("{base_id}")' if base_id else
                 f'model = AutoModelForCausalLM.from_pretrained("BASE_MODEL")  # {base_name}, the run\'s base model')
    code += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "", load_base]
    for e in earlier:
        code.append(f'model = PeftModel.from_pretrained(model, "PATH/{e}").merge_and_unload()')
    code += ['model = PeftModel.from_pretrained(model, "PATH")  # .merge_and_unload() for plain weights', "```", ""]
    return code


def _scorecard(report: dict[str, Any] | None) -> list[str]:
    """`spoctl eval`'s report, when there is one, rendered by the eval module's own table functions; a report it
    cannot read (another spoctl version) falls back to its list-of-records tables, or compact JSON."""
    if not report:
        return []
    where = f"eval/{report['eval_id']}/report.json" if report.get("eval_id") else "eval/report.json"
    lines = ["## Evaluation", "", f"From `spoctl eval` on the whole run (`{where}`); k = stage.", ""]
    try:
        from ..evaluate.report import scorecard_table, winrate_table

        judge = (report.get("judge") or {}).get("name")
        found = [("Accuracy of log(pi_k / pi_0) on each dimension's held-out pairs (r: stage k's implicit reward)",
                  scorecard_table(report)),
                 (f"Judged win rate vs the base model ({judge}), 95% interval, wins/ties/losses", winrate_table(report))]
        for title, (cols, rows) in found:
            if rows:
                lines += [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]
        if len(lines) > 4:
            return lines
    except (ImportError, KeyError, TypeError, AttributeError):
        pass
    tables = {k: v for k, v in report.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
    for name, rows in tables.items():
        cols = [c for c in rows[0] if all(isinstance(r.get(c), (str, int, float, bool, type(None))) for r in rows)]
        if not cols:
            continue
        lines += [f"**{name}**", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows] + [""]
    if len(lines) == 4:
        text = json.dumps(report, indent=1, default=str)
        lines += ["```json", text if len(text) < 6000 else text[:6000] + "\n...", "```", ""]
    return lines


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)

"""The model card (README.md): Hugging Face YAML metadata, then what the model is and how it was made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..models import resolve_model_source
from ..naming import is_hub_id
from .check import CheckResult
from .stage import ExportSource

def hub_id(spec: str | None) -> str | None:
    """`spec` when it names a Hub repository (not a local file or folder), else None."""
    if not spec or not is_hub_id(spec) or Path(spec).exists():
        return None
    try:
        return spec if resolve_model_source(spec).kind == "hub" else None
    except Exception:  # a malformed local path is simply not a Hub id
        return None


def data_sources(src: ExportSource) -> dict[str, dict[str, Any] | None]:
    """Each exported dimension's entry in the prepared-data manifest; None where it cannot be read any more."""
    from ..data.store import load_prepared
    from ..errors import UsageError

    try:
        prepared = load_prepared(src.manifest["data"])
    except UsageError:
        return {d: None for d in src.dims}
    out: dict[str, dict[str, Any] | None] = {}
    for d in src.dims:
        info = prepared.manifest["dimensions"].get(d)
        want = (src.manifest.get("data_hashes") or {}).get(d) or {}
        same = info and want and all((info.get("hashes") or {}).get(s) == h for s, h in want.items())
        # A prepared folder re-made with other data since the run describes something else: say unknown.
        out[d] = info if same else None
    return out


def render_card(src: ExportSource, *, kind: str, dtype: str, base_id: str | None, check: CheckResult,
                earlier: list[str], eval_report: dict[str, Any] | None, sources: dict[str, Any]) -> str:
    st_all = src.manifest["stages"]
    tags = ["spoctl", "spo", "dpo", "alignment", "preference-optimization", *(["lora"] if src.lora else [])]
    meta: dict[str, Any] = {}
    if base_id:
        meta["base_model"] = base_id
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = tags
    hub_data = sorted({i["source"] for i in sources.values() if i and hub_id(i.get("source"))})
    if hub_data:  # the Hub only links Hub dataset ids; local files are named in the text below
        meta["datasets"] = hub_data
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    title = f"{Path(src.base_spec).stem if not base_id else base_id.split('/')[-1]} aligned with SPO: " \
            + " → ".join(src.dims)
    lines += [f"# {title}", ""]
    lines += [
        f"This model is **stage {src.index} of {len(st_all)}** of a Sequential Preference Optimization (SPO) run made "
        "with spoctl: starting from the base model, it was aligned to one preference "
        "dimension after another, each stage keeping the earlier dimensions' preferences in its objective.", "",
        f"- **Base model:** `{base_id or src.base_spec}`" + ("" if base_id else " (a local model)"),
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
    lines += ["", "## Data", "", "| dimension | source | format | train pairs | eval pairs |",
              "| --- | --- | --- | --- | --- |"]
    for st in src.stages:
        info, pairs = sources.get(st["dim"]), st.get("pairs") or {}
        if info:
            c = info.get("counts") or {}
            lines.append(f"| {st['dim']} | `{info.get('source', 'unknown')}` | {info.get('format', '?')} | "
                         f"{c.get('train', pairs.get('train', '?'))} | {c.get('eval', pairs.get('eval', '?'))} |")
        else:
            lines.append(f"| {st['dim']} | unknown (prepared data no longer available) | unknown | "
                         f"{pairs.get('train', 'unknown')} | {pairs.get('eval', 'unknown')} |")
    lines += ["", "Data hashes (sha256 of the token ids of each split) are in `spoctl_lineage.json`.", ""]
    lines += _scorecard(eval_report)
    lines += _loading(kind, base_id or src.base_spec, earlier)
    lines += ["## Lineage and verification", "",
              "`spoctl_lineage.json` records the run, the data hashes, each stage's settings and weight fingerprint, "
              "and the sha256 of every file in this folder.", "",
              f"Before this folder was written, its model scored {check.pairs} held-out pairs ({check.source}) like "
              f"the training checkpoint: largest difference in summed log-probs {check.max_abs_diff:.3g} "
              f"(tolerance {check.rtol:g} relative + {check.atol:g})"
              + (f"; drift from the float32 checkpoint {check.drift_per_token:.3g} nats/token "
                 f"(limit {check.drift_limit:g})" if check.drift_per_token is not None else "") + ".", ""]
    return "\n".join(lines)


def _loading(kind: str, base: str, earlier: list[str]) -> list[str]:
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
    code += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
             f'model = AutoModelForCausalLM.from_pretrained("{base}")']
    for e in earlier:
        code.append(f'model = PeftModel.from_pretrained(model, "PATH/{e}").merge_and_unload()')
    code += ['model = PeftModel.from_pretrained(model, "PATH")  # .merge_and_unload() for plain weights', "```", ""]
    return code


def _scorecard(report: dict[str, Any] | None) -> list[str]:
    """`spoctl eval`'s report, when there is one, rendered by the eval module's own table functions; a report it
    cannot read (another spoctl version) falls back to its list-of-records tables, or compact JSON."""
    if not report:
        return []
    lines = ["## Evaluation", "", "From `spoctl eval` on the whole run (`eval/report.json`); k = stage.", ""]
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

"""The dataset card (README.md) of an export: Hub YAML front matter, then how the data was made, in prose.

The front matter follows the Hub's dataset card metadata (license, language, task_categories, size_categories,
configs); `configs` points at data/{split}*.parquet, which matches both the local files and the shards that
`DatasetDict.push_to_hub` writes. The prose is built only from the store: seeds, model, backend, the sampling
settings each generation was made with, every filter's rejection count, the dedup threshold, decontamination.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from datagen import __version__
from datagen.export_config import ExportConfig, ExportResult, RunFacts
from storage.queries import NOT_JUDGED

SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
]
"""The Hub's size_categories values (huggingface_hub: the dataset card metadata spec, size_categories), upper bounds
exclusive; above the last one: n>1T."""

COLUMN_DOCS = {
    "instruction": "the task, as the model wrote it",
    "input": "the task's input (empty when the task needs none)",
    "output": "the model's answer",
    "text": "the full training text (for alpaca: Stanford Alpaca's prompt template with the output appended)",
    "messages": "chat turns: optional system, then user (instruction, a blank line, input) and assistant (output)",
    "prompt": "Stanford Alpaca's prompt template filled with instruction and input, up to `### Response:`",
    "completion": "the output: train on it alone for completion-only loss",
    "run": "the datagen run the row comes from",
    "model": "the model that wrote the output",
    "generation_id": "id of the stored generation (exact prompt, raw completion, sampling) that wrote the output",
    "similarity": "ROUGE-L F of the instruction to its nearest neighbour (seeds and kept instructions) when it was accepted",
}

CITATIONS = {
    "Self-Instruct": """@inproceedings{wang-etal-2023-self-instruct,
  title     = {Self-Instruct: Aligning Language Models with Self-Generated Instructions},
  author    = {Wang, Yizhong and Kordi, Yeganeh and Mishra, Swaroop and Liu, Alisa and Smith, Noah A. and
               Khashabi, Daniel and Hajishirzi, Hannaneh},
  booktitle = {Proceedings of the 61st Annual Meeting of the Association for Computational Linguistics (Volume 1: Long Papers)},
  year      = {2023},
  url       = {https://aclanthology.org/2023.acl-long.754}
}""",
    "Alpaca": """@misc{alpaca,
  author       = {Rohan Taori and Ishaan Gulrajani and Tianyi Zhang and Yann Dubois and Xuechen Li and
                  Carlos Guestrin and Percy Liang and Tatsunori B. Hashimoto},
  title        = {Stanford Alpaca: An Instruction-following LLaMA model},
  year         = {2023},
  publisher    = {GitHub},
  howpublished = {\\url{https://github.com/tatsu-lab/stanford_alpaca}}
}""",
    "Toolformer": """@inproceedings{schick2023toolformer,
  title     = {Toolformer: Language Models Can Teach Themselves to Use Tools},
  author    = {Schick, Timo and Dwivedi-Yu, Jane and Dess{\\`\\i}, Roberto and Raileanu, Roberta and Lomeli, Maria and
               Hambro, Eric and Zettlemoyer, Luke and Cancedda, Nicola and Scialom, Thomas},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {36},
  year      = {2023}
}""",
}

DEFAULT_LICENSE_NAME = "synthetic-seed-and-model-terms"
"""license_name of a `license: other` card: the terms follow from the seeds' license and the generating model's."""

METHOD_OF_PIPELINE = {"self-instruct": "Self-Instruct", "alpaca": "Alpaca", "toolformer": "Toolformer"}


def size_category(rows: int) -> str:
    for limit, name in SIZE_CATEGORIES:
        if rows < limit:
            return name
    return "n>1T"


def front_matter(config: ExportConfig, result: ExportResult, splits: list[str]) -> dict[str, Any]:
    pipelines = sorted({f.pipeline for f in result.runs})
    license: dict[str, str] = {"license": config.license}
    if config.license == "other":  # the Hub's card spec: `license: other` needs an id in license_name
        license["license_name"] = config.license_name or DEFAULT_LICENSE_NAME
    return {
        **license,
        "language": [config.language],
        "task_categories": ["text-generation"],
        "size_categories": [size_category(result.counts["rows"])],
        "pretty_name": f"datagen {', '.join(f.name for f in result.runs)} ({config.format.value})",
        "tags": ["synthetic", "datagen", *pipelines, config.format.value],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}*.parquet"} for split in splits],
            }
        ],
    }


def render_card(config: ExportConfig, result: ExportResult, splits: list[str]) -> str:
    counts = result.counts
    split_text = ", ".join(f"{split} {counts[split]}" for split in splits)
    lines = [
        "---",
        yaml.safe_dump(front_matter(config, result, splits), sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {', '.join(f.name for f in result.runs)}",
        "",
        _summary(config, counts, split_text),
        "",
        "## Load",
        "",
        "```python",
        "from datasets import load_dataset, load_from_disk",
        "",
        "dataset = load_from_disk(\"path/to/this/folder\")  # the export folder as written",
        f"dataset = load_dataset(\"parquet\", data_files={json.dumps({s: f'data/{s}.parquet' for s in splits})})",
        "```",
        "",
        "`datagen train --data path/to/this/folder` reads it as it is (`datagen.json` names the format and columns).",
        "",
        "## Columns",
        "",
        "| column | what it holds |",
        "|---|---|",
        *(f"| `{column}` | {_column_doc(column, config)} |" for column in result.columns),
        "",
        "## Split",
        "",
        _split_text(config, counts),
        "",
        "## How it was made",
        "",
    ]
    for facts in result.runs:
        lines += _run_section(facts)
    lines += ["## Decontamination", "", _decontamination_text(config, counts), ""]
    lines += ["## Known limitations", "", *_limitations(result), ""]
    lines += ["## License", "", _license_text(config), ""]
    lines += _citation_section(result)
    return "\n".join(lines) + "\n"


def _summary(config: ExportConfig, counts: dict[str, Any], split_text: str) -> str:
    if config.format.value == "toolformer":
        return (
            f"Toolformer fine-tuning data made with datagen {__version__}: **{counts['rows']} texts** ({split_text}) with the "
            "API calls a language model proposed and its own loss kept, inserted inline (Schick et al. 2023). "
            "Nothing here was checked by a person."
        )
    return (
        f"Synthetic instruction-tuning data generated by a language model with datagen {__version__}: "
        f"**{counts['rows']} rows** ({split_text}) from {counts['tasks']} instructions, in the `{config.format.value}` format. "
        "Every row is a model-written instance of a model-written instruction that passed all of datagen's filters; "
        "nothing here was checked by a person."
    )


def _column_doc(column: str, config: ExportConfig) -> str:
    if column == "text" and config.format.value == "toolformer":
        return "the corpus text with its kept API calls inserted where the model made them, e.g. `[Calculator(400 / 1400) -> 0.29]`"
    if column == "generation_id" and config.format.value == "toolformer":
        return "id of the stored generation that sampled the text's first inserted call"
    if column == "similarity" and config.format.value == "toolformer":
        return "empty for Toolformer texts"
    return COLUMN_DOCS.get(column, "")


def _split_text(config: ExportConfig, counts: dict[str, Any]) -> str:
    if "test" not in counts:
        return "All rows are in `train` (exported with `--test-size 0`)."
    if config.format.value == "toolformer":
        return (
            f"A seeded shuffle (seed {config.seed}) puts {config.test_size:.0%} of the texts (at least one) in `test`: "
            f"`train` has {counts['train']} texts, `test` {counts['test']}."
        )
    return (
        f"Instructions, not rows, are split: a seeded shuffle (seed {config.seed}) puts {config.test_size:.0%} of the "
        f"instructions (at least one), with all their instances, in `test`, so no instruction is on both sides. "
        f"`train` has {counts['train']} rows, `test` {counts['test']}."
    )


def _run_section(facts: RunFacts) -> list[str]:
    if facts.pipeline == "toolformer":
        return _toolformer_section(facts)
    config = facts.config
    seeds_path = config.get("seeds") or config.get("seed_tasks_path")
    seeds = f"{facts.seed_tasks} seed tasks" + (f" from `{seeds_path}`" if seeds_path else "")
    if facts.seed_tasks == 175 and seeds_path and "seed_tasks" in str(seeds_path):
        seeds += " (Self-Instruct's 175 human-written seed tasks, yizhongw/self-instruct)"
    threshold = _find(config, ("rouge_threshold", "similarity_threshold", "dedup_threshold"))
    not_judged = facts.rejected_by_reason.get(NOT_JUDGED, 0)
    rejected = sum(facts.rejected_by_reason.values()) - not_judged
    keep_rate = f"{facts.accepted / (facts.accepted + rejected):.0%}" if facts.accepted + rejected else "n/a"
    lines = [
        f"### Run `{facts.name}`",
        "",
        f"- Pipeline: `{facts.pipeline}` (status {facts.status}, started {facts.created_at}).",
        f"- Model: `{facts.model}` on the `{facts.backend}` backend.",
        f"- Source seeds: {seeds}.",
        f"- Instructions: {facts.instructions} generated, {facts.accepted} accepted, {rejected} rejected (keep rate {keep_rate}, "
        f"accepted / (accepted + rejected)); {not_judged} not judged (stored as {NOT_JUDGED} after the run met its target).",
        f"- Instances: {facts.instances_accepted} accepted, {sum(facts.instances_rejected_by_reason.values())} rejected; "
        f"accepted instructions left without an accepted instance (not exported): {facts.tasks_without_instances}.",
        "- Near-duplicate filter: an instruction is dropped when its ROUGE-L F-measure with any seed or earlier kept "
        f"instruction exceeds {threshold if threshold is not None else 'the threshold (not recorded in this run)'} (Self-Instruct's rule).",
        *_curation_lines(facts.curation),
        "",
    ]
    if facts.sampling:
        lines += ["Sampling settings, per kind of model call:", "", "| call | settings |", "|---|---|"]
        for purpose, sampling in facts.sampling.items():
            shown = {k: v for k, v in sampling.items() if v not in (None, [], (), {})}
            settings = json.dumps(shown, ensure_ascii=False).replace("|", "\\|")
            lines.append(f"| {purpose} | `{settings}` |")
        lines.append("")
    for title, reasons in (("Instructions rejected", facts.rejected_by_reason), ("Instances rejected", facts.instances_rejected_by_reason)):
        if reasons:
            lines += [f"{title}, by the first filter that failed:", "", "| reason | count |", "|---|---:|"]
            lines += [f"| {reason.replace('|', '/')} | {count} |" for reason, count in reasons.items()]
            lines.append("")
    if config:
        lines += [
            "<details><summary>Full run configuration</summary>",
            "",
            "```yaml",
            yaml.safe_dump(config, sort_keys=True, allow_unicode=True).rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return lines


def _curation_lines(curation: dict[str, Any] | None) -> list[str]:
    """The run's curation (`datagen curate`): its rule, the scores it read, and what it kept."""
    if not curation:
        return []
    effect = ("the dropped instances are not in this export" if curation["applied"]
              else "exported with --ignore-curation: the dropped instances are in this export too")  # fmt: skip
    return [
        f"- Curation (`datagen curate`, {curation['created_at']}): rule `{curation['rule']}` over the scores "
        f"{', '.join(f'`{s}`' for s in curation['scores'])}; of {curation['kept'] + curation['dropped']} accepted instances "
        f"{curation['kept']} kept, {curation['dropped']} dropped; {effect}."
    ]


def _toolformer_section(facts: RunFacts) -> list[str]:
    """Toolformer (Schick et al. 2023, section 2): positions sampled by p(<API>) > tau_s, up to m calls each, executed, and
    kept when the call and its result lower the weighted loss of the following tokens by tau_f."""
    config = facts.config
    settings = config.get("settings") or {}
    exported = facts.texts - facts.tasks_without_instances
    lines = [
        f"### Run `{facts.name}`",
        "",
        f"- Pipeline: `toolformer` (status {facts.status}, started {facts.created_at}).",
        f"- Model: `{facts.model}` on the `{facts.backend}` backend; it both proposes the API calls and scores them.",
        f"- Corpus: `{config.get('corpus', 'not recorded')}`, {facts.texts} texts processed. Exported (at least one kept call): "
        f"{exported}; left out (no kept call, as in the paper's C*): {facts.tasks_without_instances}.",
        f"- Call syntax: `{config.get('api_start', '[')}Tool(argument) {config.get('result_arrow', '->')} result{config.get('api_end', ']')}`.",
        "",
    ]
    if facts.api_calls:
        statuses = sorted({status for counts in facts.api_calls.values() for status in counts} - {"inserted"})
        lines += [
            "Sampled API calls per tool, by outcome (kept: the loss filter passed; inserted: the best kept call at its position):",
            "",
            "| tool | tau_s | k | m | tau_f | " + " | ".join(statuses) + " | inserted |",
            "|---|---:|---:|---:|---:|" + "---:|" * (len(statuses) + 1),
        ]
        for tool, counts in facts.api_calls.items():
            tool_settings = settings.get(tool, {})
            knobs = " | ".join(str(tool_settings.get(knob, "")) for knob in ("tau_s", "k", "m", "tau_f"))
            lines.append(f"| {tool} | {knobs} | " + " | ".join(str(counts.get(st, 0)) for st in statuses) + f" | {counts.get('inserted', 0)} |")
        lines.append("")
    if facts.sampling:
        lines += ["Sampling settings, per kind of model call:", "", "| call | settings |", "|---|---|"]
        for purpose, sampling in facts.sampling.items():
            shown = {k: v for k, v in sampling.items() if v not in (None, [], (), {})}
            lines.append(f"| {purpose} | `{json.dumps(shown, ensure_ascii=False).replace('|', chr(92) + '|')}` |")
        lines.append("")
    if config:
        lines += ["<details><summary>Full run configuration</summary>", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=True, allow_unicode=True).rstrip(), "```", "", "</details>", ""]  # fmt: skip
    return lines


def _find(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The first of `keys` in the config or one level down (configs group fields by step)."""
    for key in keys:
        if key in config:
            return config[key]
    for value in config.values():
        if isinstance(value, dict):
            found = _find(value, keys)
            if found is not None:
                return found
    return None


def _decontamination_text(config: ExportConfig, counts: dict[str, Any]) -> str:
    dropped = counts.get("decontaminated") or {}
    if config.decontaminate is None:
        return "Not decontaminated: no evaluation set was given (`datagen export --decontaminate EVAL.jsonl`)."
    return (
        f"Checked against `{config.decontaminate.name}`: rows were dropped when the instruction's ROUGE-L F-measure with an "
        f"evaluation item exceeded {config.decontamination_threshold} ({dropped.get('rougeL', 0)} rows), or when the row shared a "
        f"{config.ngram}-word sequence with one (the GPT-3 paper's contamination test; "
        f"{dropped.get(f'{config.ngram}-gram', 0)} rows)."
    )


def _license_text(config: ExportConfig) -> str:
    if config.license != "other":
        return f"Released under `{config.license}` (set with `datagen export --license`)."
    return (
        f"`license: other` (`{config.license_name or DEFAULT_LICENSE_NAME}`): no license was chosen at export. The terms "
        "that apply follow from the seed tasks' license and the terms of use of the model that wrote the data; check "
        "both, then re-export with `--license ID` (a Hub license id, e.g. apache-2.0)."
    )


def _limitations(result: ExportResult) -> list[str]:
    if all(f.pipeline == "toolformer" for f in result.runs):
        lines = [
            "- API calls were proposed and judged by the same model: a call is kept when it lowers that model's loss on the "
            "following tokens, not because it is correct; check results before relying on them.",
            "- Only texts with at least one kept call are included, so the data over-represents texts where tools help.",
        ]
    else:
        lines = [
            "- Instructions, inputs and outputs are all model-written and unverified: expect factual errors, wrong answers "
            "to classification and reasoning tasks, and the biases of the model and of the seed tasks.",
            "- The ROUGE-L filter removes near-copies by wording only; paraphrases of the same task stay.",
            "- The keyword filters (e.g. image, graph, file) drop tasks a text model cannot do, and some that it can.",
        ]
    if any("135m" in f.model.lower() or "smollm2" in f.model.lower() for f in result.runs):
        lines.append(
            "- Made by a 135M-parameter model (SmolLM2-135M-Instruct): a demonstration of the pipeline, not data to train a useful model on."
        )
    if result.counts.get("tasks_without_instances") and config_is_instructions(result):
        lines.append(f"- {result.counts['tasks_without_instances']} accepted instructions had no accepted instance and are left out.")
    return lines


def config_is_instructions(result: ExportResult) -> bool:
    return any(f.pipeline != "toolformer" for f in result.runs)


def _citation_section(result: ExportResult) -> list[str]:
    used = [METHOD_OF_PIPELINE[f.pipeline] for f in result.runs if f.pipeline in METHOD_OF_PIPELINE]
    methods = list(dict.fromkeys(used + ["Self-Instruct", "Alpaca", "Toolformer"]))
    lines = [
        "## Citation",
        "",
        f"This data was made with {', '.join(dict.fromkeys(used)) or 'datagen'}'s method; cite the method your use depends on.",
        "",
    ]
    for method in methods:
        lines += [f"{method}:", "", "```bibtex", CITATIONS[method], "```", ""]
    return lines

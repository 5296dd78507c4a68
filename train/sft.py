"""Supervised fine-tuning on a `datagen export`: full, LoRA, QLoRA and DoRA in one recipe.

    datagen train --data data/example --method lora --out runs/lora --merge
    datagen generate prompts.jsonl --model runs/lora/merged

Shaped like a torchtune recipe (pytorch/torchtune: recipes/lora_finetune_single_device.py) without its
boilerplate: `__init__` checks everything that can be checked without a model and fails with exit 2 (bad data
folder or columns, missing bitsandbytes, an existing --out); `setup()` builds model → tokenizer → data →
trainer in dependency order; `train()` runs and writes the outputs. QLoRA is the LoRA recipe with the base
loaded in 4-bit NF4. The loop, the optimizer, LoRA layers, tokenization, completion masking and packing are
the maintained libraries' (TRL's SFTTrainer, transformers' Trainer, peft, bitsandbytes).

Outputs in OUT: the adapter (adapter_model.safetensors + adapter_config.json) or the full model, the tokenizer,
merged/ (--merge), checkpoints/ (for --resume), loss_curve.png, train_summary.json, train_config.yaml.

Several processes run data-parallel (DDP; tested here with two CPU processes on gloo):

    torchrun --nproc_per_node 8 "$(which datagen)" train --data DIR --method lora --out OUT
    torchrun --nnodes 2 --node_rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 --nproc_per_node 8 "$(which datagen)" train ...

A full fine-tune too big for one GPU shards with FSDP through an accelerate config, e.g. TRL's
trl/accelerate_configs/fsdp2.yaml (not tested here: no GPU):

    accelerate launch --config_file fsdp2.yaml --num_processes 8 "$(which datagen)" train --method full ...

The effective batch is batch_size x gradient_accumulation_steps x processes. Only the main process writes the
store row, the plot, the summary and merged/.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import json
import re
import resource
import shutil
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import logging

# bitsandbytes warns at import, on CPUs with avx512_bf16, that the optional `kernels` package (which would download
# a kernel from the Hugging Face hub) is missing; training works without it (issue 7), so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import yaml  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from datagen import models
from datagen.errors import BadInput, DatagenError
from datagen.export import is_export
from datagen.jsonl import read_config_file
from train.config import Method, Precision, TrainConfig
from train.data import Export, has_prompt, open_export, training_split

SUMMARY_FILE = "train_summary.json"
CONFIG_FILE = "train_config.yaml"
LOSS_CURVE_FILE = "loss_curve.png"
CHECKPOINTS = "checkpoints"
MERGED = "merged"

RESUME_MUST_MATCH = ("method", "model", "lora_r", "lora_alpha", "lora_target_modules", "packing", "max_length",
                     "context_length", "rope", "rope_factor", "trainable")
"""Options a resumed run must share with the run that wrote the checkpoint (others, like max_steps, may change)."""


class SFTRecipe:
    def __init__(self, config: TrainConfig, db_url: str | None = None, callbacks: Sequence[Any] = ()):
        """Check everything that needs no model, in the order a user would fix it; nothing is loaded or written
        here except an on-the-fly export of a run into OUT/data. An export folder given as --data is checked
        before the store is opened, so a data error leaves no database behind."""
        self.config = config
        self.callbacks = list(callbacks)
        require_packages(config.method)

        from accelerate import PartialState

        self.state = PartialState()  # under torchrun/accelerate this joins the process group
        self.precision = resolve_precision(config.precision)
        self.out = config.out.expanduser().resolve()
        self.last_checkpoint, self.incomplete_checkpoints = check_output(self.out, config)
        self.name = run_name(self.out, config)
        self.model_path = models.resolve(config.model)
        from train.rope import scaled_config

        # the base's config with RoPE scaled for --context-length (None: as it is); read now so a bad option exits 2
        self.model_config = scaled_config(self.model_path, config.context_length, config.rope, config.rope_factor)

        folder = export_folder(config.data)
        if folder is not None:
            self._open_data(folder, exported_here=False)

        from storage.store import open_engine

        self.engine = open_engine(db_url) if self.state.is_main_process else None
        if self.engine is not None:
            check_name(self.engine, self.name, self.out)
        if folder is None:
            self._open_data(export_run(config, self.out, self.engine, self.state), exported_here=True)

    def _open_data(self, path: Path, exported_here: bool) -> None:
        self.data_path, self.exported_here = path, exported_here
        self.export: Export = open_export(path)
        self.train_rows = training_split(self.export, "train", self.config.max_train_samples)
        self.eval_rows = training_split(self.export, self.config.eval_split, self.config.max_eval_samples)

    # --- setup: model → tokenizer → data → trainer ---------------------------------------------------------------------

    def setup(self) -> None:
        if self.state.is_main_process and self.last_checkpoint is None:
            if self.config.overwrite and self.out.exists() and not self.exported_here:
                shutil.rmtree(self.out)  # check_output made sure it is a datagen training output
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / CONFIG_FILE).write_text(self.resolved_config().to_yaml(), encoding="utf-8")
        if self.state.is_main_process:
            for folder in self.incomplete_checkpoints:  # half-written by a killed save; the Trainer would count them
                print(f"--resume: {folder.name} is incomplete (a save was interrupted); removed it, continuing from "
                      f"{self.last_checkpoint.name}", file=sys.stderr)  # fmt: skip
                shutil.rmtree(folder)
        self.state.wait_for_everyone()
        self.model = load_model(self.model_path, self.config, self.precision, self.state, self.model_config)
        self.tokenizer = load_tokenizer(self.model_path)
        self.trainer = build_trainer(
            self.model, self.tokenizer, self.train_rows, self.eval_rows, self.config, self.precision, self.export.format,
            self.out, resuming=self.last_checkpoint is not None, callbacks=self.callbacks,
        )  # fmt: skip

    def quantization(self):
        return quantization_config(self.config, self.precision)

    def resolved_config(self) -> TrainConfig:
        return self.config.model_copy(update={"name": self.name, "data": str(self.data_path), "out": self.out})

    # --- train ------------------------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Train (resuming from the last checkpoint with --resume), measure the eval loss, save, merge, plot and
        record. Returns the summary written to OUT/train_summary.json."""
        import torch

        row_id = self._record_start() if self.state.is_main_process else None
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            meter = next(c for c in self.trainer.callback_handler.callbacks if isinstance(c, ThroughputMeter))
            result = self.trainer.train(resume_from_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None)
            eval_loss = self._final_eval_loss() if self.trainer.eval_dataset is not None else None
            if self.config.s2_attn:
                self.trainer.model.set_attn_implementation("sdpa")  # S²-Attn is for training; the saved model attends fully
            self.trainer.save_model(str(self.out))  # adapter or full model, plus the tokenizer; main process only
            summary = self._summary(result, eval_loss, meter)
            log_history = list(self.trainer.state.log_history)
            measure = self.config.merge and self.state.is_main_process and self.trainer.eval_dataset is not None
            batch_size = self.config.eval_batch_size or self.config.batch_size
            if measure:  # the model that was trained and evaluated, on the same metric as the merged model below
                adapter_loss = token_eval_loss(self.trainer.model, self.trainer.eval_dataset, self.trainer.data_collator, batch_size)
            self._release_training_model()
            self.state.wait_for_everyone()
            if self.state.is_main_process:
                if self.config.merge:
                    into = self.config.merge_base if self.config.method is Method.qlora else "original"
                    dtype = merged_dtype(self.config, self.precision)
                    merged = merge_adapter(self.model_path, self.out, dtype, self.quantization() if into == "dequantized" else None,
                                           self.model_config)  # fmt: skip
                    save_merged(merged, self.out, self.out / MERGED)
                    summary["merged"] = str(self.out / MERGED)
                    summary["merge"] = {"into": into, "dtype": dtype}
                    if measure:
                        merged_loss = token_eval_loss(merged, self.trainer.eval_dataset, self.trainer.data_collator, batch_size)
                        summary["merge"] |= {"adapter_eval_loss": adapter_loss, "merged_eval_loss": merged_loss,
                                             "gap": merged_loss - adapter_loss}  # fmt: skip
                    del merged
                    gc.collect()
                from train.plots import plot_loss_curve

                plot_loss_curve(log_history, self.out / LOSS_CURVE_FILE, f"{self.config.method.value} on {self.data_path.name}")
                (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
                (self.out / CONFIG_FILE).write_text(self.resolved_config().to_yaml(), encoding="utf-8")
                self._record_end(row_id, summary)
            self.state.wait_for_everyone()
            return summary
        except BaseException as err:
            for callback in self.trainer.callback_handler.callbacks:
                if isinstance(callback, RichProgress):
                    callback.on_train_end(None, None, None)  # stop the live bar before the error prints
            if row_id is not None:
                self._record_end(row_id, None, error=f"{type(err).__name__}: {err}")
            raise

    def _final_eval_loss(self) -> float:
        metrics = self.trainer.evaluate()
        if "eval_loss" not in metrics:  # no eval row kept a learned token after truncation
            raise DatagenError(
                f"no eval loss: every eval row's completion lies beyond --max-length {self.config.max_length} tokens "
                f"(split '{self.config.eval_split}'); raise --max-length or --set max_eval_samples=N for more rows"
            )
        return metrics["eval_loss"]

    def _summary(self, result, eval_loss: float | None, meter: ThroughputMeter) -> dict[str, Any]:
        import torch

        history = self.trainer.state.log_history
        train_losses = [e["loss"] for e in history if "loss" in e]
        eval_losses = sorted((e["step"], e["eval_loss"]) for e in history if "eval_loss" in e)
        model = self.trainer.model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        on_gpu = torch.cuda.is_available()
        return {
            "name": self.name,
            "method": self.config.method.value,
            "model": self.config.model,
            "dataset": str(self.data_path),
            "format": self.export.format,
            "train_rows": len(self.train_rows),
            "eval_rows": len(self.eval_rows) if self.eval_rows is not None else 0,
            "loss_on": "completion" if self.config.completion_only_loss and has_prompt(self.export.format) else "all tokens",
            "packing": self.config.packing,
            "precision": self.precision.value,
            "processes": self.state.num_processes,
            "steps": self.trainer.state.global_step,
            "epochs": round(float(self.trainer.state.epoch or 0), 4),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "model_memory_bytes": int(model.get_memory_footprint()),
            "train_tokens": meter.tokens,
            "train_seconds": round(meter.seconds, 3),
            "tokens_per_s": round(meter.tokens / meter.seconds, 1) if meter.seconds else None,
            "peak_memory_bytes": peak_memory_bytes(),
            "peak_memory_kind": "cuda max allocated" if on_gpu else "cpu max RSS of the main process",
            "initial_eval_loss": eval_losses[0][1] if eval_losses and eval_losses[0][0] == 0 else None,
            "eval_loss": eval_loss,
            "final_train_loss": train_losses[-1] if train_losses else None,
            "mean_train_loss": result.training_loss,
            "out": str(self.out),
            **self.provenance(),
        }

    def _release_training_model(self) -> None:
        """Free the training weights before a merge reloads the base."""
        import torch

        self.model = None
        self.trainer.model = self.trainer.model_wrapped = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- the store ----------------------------------------------------------------------------------------------------------

    def provenance(self) -> dict[str, Any]:
        """What the data and the software were: datasets' fingerprint of each split (from the export's state.json;
        a re-export with other rows or columns changes it), the export's split seed, and the library versions."""
        return {
            "dataset_fingerprint": {name: split._fingerprint for name, split in self.export.splits.items()},
            "export_seed": self.export.seed,
            "library_versions": library_versions(self.config.method),
        }

    def _record_start(self) -> int:
        """The run's row, written afresh: a reused --name (on the same OUT, see check_name) keeps nothing of the
        earlier run but its id."""
        from sqlmodel import Session, delete, select

        from storage.store import find_run, touch
        from storage.tables import TrainingRun, TrainingRunSource

        with Session(self.engine) as session:
            row = session.exec(select(TrainingRun).where(TrainingRun.name == self.name)).first()
            fields = dict(
                method=self.config.method.value, model=self.config.model, dataset=str(self.data_path),
                dataset_format=self.export.format, dataset_runs=self.export.runs, out=str(self.out),
                config=self.resolved_config().model_dump(mode="json"), status="running", error=None,
                summary=self.provenance(), steps=0, train_loss=None, eval_loss=None, tokens_per_s=None, peak_memory_bytes=None,
            )  # fmt: skip
            if row is None:
                row = TrainingRun(name=self.name, **fields)
            else:
                touch(row, **fields)
                session.exec(delete(TrainingRunSource).where(TrainingRunSource.training_run_id == row.id))
            session.add(row)
            session.flush()
            for name in dict.fromkeys(str(r) for r in self.export.runs):
                if (run := find_run(session, name)) is not None:
                    session.add(TrainingRunSource(training_run_id=row.id, run_id=run.id))
            session.commit()
            return row.id

    def _record_end(self, row_id: int, summary: dict[str, Any] | None, error: str | None = None) -> None:
        from sqlmodel import Session

        from storage.store import touch
        from storage.tables import StageTime, TrainingRun

        with Session(self.engine) as session:
            row = session.get(TrainingRun, row_id)
            if summary is None:
                touch(row, status="failed", error=error)
            else:
                touch(
                    row, status="completed", error=None, summary=summary, steps=summary["steps"],
                    train_loss=summary["final_train_loss"], eval_loss=summary["eval_loss"],
                    tokens_per_s=summary["tokens_per_s"], peak_memory_bytes=summary["peak_memory_bytes"],
                )  # fmt: skip
                # device seconds for cost accounting (datagen/cost.py): each process holds one GPU, or the CPU machine
                on_gpu = summary["peak_memory_kind"].startswith("cuda")
                session.add(StageTime(training_run_id=row_id, stage="training", device="cuda" if on_gpu else "cpu",
                                      model=self.config.model,
                                      seconds=summary["train_seconds"] * (summary["processes"] if on_gpu else 1)))  # fmt: skip
            session.add(row)
            session.commit()


# --- Checks that run before any model is loaded ---------------------------------------------------------------------------


def require_packages(method: Method) -> None:
    missing = [p for p in ("peft", "trl") if importlib.util.find_spec(p) is None]
    if missing:
        raise BadInput(f"datagen train needs {' and '.join(missing)}: pip install 'datagen[train]'")
    if method is Method.qlora and importlib.util.find_spec("bitsandbytes") is None:
        raise BadInput("--method qlora needs bitsandbytes (4-bit NF4 base weights): pip install 'datagen[train]'")


def resolve_precision(precision: Precision) -> Precision:
    import torch

    on_gpu = torch.cuda.is_available()
    if precision is Precision.auto:
        return Precision.bf16 if on_gpu and torch.cuda.is_bf16_supported() else Precision.fp32
    if precision is Precision.fp16 and not on_gpu:
        raise BadInput("--precision fp16 needs a CUDA GPU; on CPU use fp32 (or bf16)")
    return precision


def is_training_output(out: Path) -> bool:
    """Whether datagen wrote `out`: its train_config.yaml (written before training starts) is a datagen training
    config, or it holds nothing but the export of a run made on the fly (a run stopped before training began)."""
    try:
        saved = yaml.safe_load((out / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        saved = None
    if isinstance(saved, dict) and {"data", "out", "method"} <= set(saved):
        return True
    return [p.name for p in out.iterdir()] == ["data"] and is_export(out / "data")


def check_output(out: Path, config: TrainConfig) -> tuple[Path | None, list[Path]]:
    """The last complete checkpoint to resume from (with --resume, else None) and the incomplete ones after it.
    An existing, non-empty OUT needs --resume (continue it) or --overwrite (delete it: only a folder datagen
    wrote)."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} exists and is not a folder")
    exists = out.is_dir() and any(out.iterdir())
    if config.resume:
        checkpoints = out / CHECKPOINTS
        last, incomplete = last_complete_checkpoint(checkpoints)
        if last is None:
            found = f" ({', '.join(p.name for p in incomplete)} incomplete)" if incomplete else ""
            raise BadInput(f"--resume: no complete checkpoint in {checkpoints}{found} to continue from; drop --resume to start afresh")
        saved = read_config_file(out / CONFIG_FILE) if (out / CONFIG_FILE).is_file() else {}
        current = config.model_dump(mode="json")
        changed = [k for k in RESUME_MUST_MATCH if k in saved and saved[k] != current[k]]
        if changed:
            pairs = ", ".join(f"{k}: {saved[k]!r} then, {current[k]!r} now" for k in changed)
            raise BadInput(f"--resume with different options than the checkpoint's run ({pairs}): pass the same ones")
        return last, incomplete
    if exists and not config.overwrite:
        raise BadInput(f"{out} exists and is not empty: pass --overwrite to replace it or --resume to continue its last checkpoint")
    if exists and not is_training_output(out):
        raise BadInput(f"--out {out} was not written by `datagen train` (no {CONFIG_FILE}): --overwrite replaces only those")
    return None, []


def last_complete_checkpoint(checkpoints: Path) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint-N that a resume can load, and the newer ones it cannot (a kill -9 during a save)."""
    found = sorted(
        (p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
        key=lambda p: int(p.name.split("-")[1]),
        reverse=True,
    ) if checkpoints.is_dir() else []  # fmt: skip
    incomplete = []
    for folder in found:
        if checkpoint_complete(folder):
            return folder, incomplete
        incomplete.append(folder)
    return None, incomplete


def checkpoint_complete(folder: Path) -> bool:
    """transformers' Trainer saves the weights, then optimizer.pt and scheduler.pt, then trainer_state.json
    (trainer.py: _save_checkpoint). Complete: trainer_state.json parses, every weights file (adapter or model,
    sharded or not) loads, and the optimizer and scheduler files are whole zip archives (torch.save's format;
    a truncated one has no central directory). The Trainer itself would start a fresh optimizer silently when
    optimizer.pt is missing."""
    from safetensors import safe_open

    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return False
        weights = [folder / n for n in ("adapter_model.safetensors", "model.safetensors") if (folder / n).is_file()]
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weights += [folder / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        if not weights:
            return False
        for path in weights:
            with safe_open(str(path), framework="pt") as tensors:
                for key in tensors.keys():
                    tensors.get_tensor(key)
        return all(zipfile.is_zipfile(folder / name) for name in ("optimizer.pt", "scheduler.pt"))
    except Exception:  # any unreadable piece (truncated JSON or safetensors, a missing file) means incomplete
        return False


def check_name(engine, name: str, out: Path) -> None:
    """A training run's name belongs to one OUT: reusing it there (--resume, --overwrite) rewrites its row; reusing it
    for another OUT would silently replace the record of a model that still exists."""
    from sqlmodel import Session, select

    from storage.tables import TrainingRun

    with Session(engine) as session:
        row = session.exec(select(TrainingRun).where(TrainingRun.name == name)).first()
    if row is not None and Path(row.out) != out:
        raise BadInput(f"--name {name}: a training run of that name wrote {row.out}; pick another --name")


def library_versions(method: Method) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from datagen import __version__

    names = ["torch", "transformers", "trl", "peft", "accelerate", "datasets"] + (["bitsandbytes"] if method is Method.qlora else [])
    versions = {"datagen": __version__}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_name(out: Path, config: TrainConfig) -> str:
    if config.name:
        return config.name
    if config.resume and (out / CONFIG_FILE).is_file() and (saved := read_config_file(out / CONFIG_FILE).get("name")):
        return str(saved)
    from storage.tables import utcnow

    return f"train-{config.method.value}-{utcnow():%Y%m%d-%H%M%S}"


def export_folder(data: str) -> Path | None:
    """--data as an export folder, or None when it names a run. A path that does not exist is an error."""
    path = Path(data).expanduser()
    if path.exists():
        return path.resolve()
    if "/" in data or data.startswith("."):
        raise BadInput(f"--data {data}: no such folder (make one with `datagen export --run RUN --out {data}`)")
    return None


def export_run(config: TrainConfig, out: Path, engine, state) -> Path:
    """Export the run --data names into OUT/data as messages, on the main process. A resumed run reuses its export
    and never deletes OUT (it holds the checkpoints); with --overwrite the old OUT (a datagen training output,
    check_output made sure) goes first."""
    target = out / "data"
    if state.is_main_process:
        if config.resume and target.exists() and not is_export(target):
            raise BadInput(f"--resume: {target} is not a datagen export (no datagen.json); restore it, or delete the folder "
                           "to export the run again")  # fmt: skip
        if config.overwrite or not target.exists():
            from sqlmodel import Session

            from datagen.export import ExportConfig, Format, export
            from storage.store import get_run

            with Session(engine) as session:
                run = get_run(session, config.data)  # BadInput when there is no such run
                if config.overwrite and out.exists():
                    shutil.rmtree(out)
                export(session, ExportConfig(runs=(run.name,), format=Format.messages, out=target))
    state.wait_for_everyone()
    return target


# --- Building the pieces ------------------------------------------------------------------------------------------------


def load_model(path: str, config: TrainConfig, precision: Precision, state, model_config=None):
    """fp32 weights for full fine-tuning (the optimizer needs full-precision masters); a bf16 frozen base for
    adapters under bf16; a 4-bit NF4 base for QLoRA (QLoRA, section 3). model_config: the base's config with
    scaled RoPE (train/rope.py), or None; with --s2-attn the model trains with S²-Attn (train/s2_attn.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    models.configure_offline()
    on_gpu = torch.cuda.is_available()
    options: dict[str, Any] = {"dtype": torch.float32, "config": copy.deepcopy(model_config)}
    if config.s2_attn:
        from transformers import AutoConfig

        from train.s2_attn import check_model_config, register

        check_model_config(model_config if model_config is not None else AutoConfig.from_pretrained(path))
        options["attn_implementation"] = register(config.s2_group_size_ratio)
    if config.method is not Method.full and precision is Precision.bf16:
        options["dtype"] = torch.bfloat16
    if config.method is Method.qlora:
        options["quantization_config"] = quantization_config(config, precision)
        # each process holds its own copy of the quantized base on its own device
        options["device_map"] = {"": state.local_process_index} if on_gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, **options)
    if config.method is Method.qlora:
        from peft import prepare_model_for_kbit_training

        if not on_gpu:
            keep_4bit_weights_trainable_on_cpu(model)

        # freezes the base, keeps norms and embeddings in fp32, and enables input gradients for checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return model


def compute_dtype(precision: Precision) -> str:
    """The dtype of the frozen base's matmuls: an adapter learns against it (bf16 or fp16 mixed precision, else fp32)."""
    return {Precision.bf16: "bfloat16", Precision.fp16: "float16"}.get(precision, "float32")


def quantization_config(config: TrainConfig, precision: Precision):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
        # QLoRA computes in bf16; the compute dtype follows --precision, so CPUs (fp32 by default) run fp32
        # matmuls on the dequantized weights: 2x faster than bf16 on the test CPU, same 4-bit storage.
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype(precision)),
    )


def keep_4bit_weights_trainable_on_cpu(model) -> None:
    """bitsandbytes 0.50 repacks a Linear4bit's weights for its CPU inference kernel at the first no-grad forward
    in eval mode (an eval pass) on CPUs with avx512_bf16, and that kernel has no backward: every later training
    step then passes almost no gradient through the frozen layers (measured here: the layer-0 LoRA gradient fell
    from 0.052 to 0.00008 after one eval forward, and the eval loss stopped falling). Turning the repacking off
    keeps training and evaluation on the dequantize-and-matmul path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss; any known token will do
    return tokenizer


TRAINABLE_MODULES = {"embed": "embed_tokens", "norm": "norm"}
"""--trainable names → peft modules_to_save suffixes: the input embeddings and every *norm module (the names in
transformers' Llama, Qwen2, Mistral and SmolLM2 code)."""


def lora_config(config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        use_dora=config.method is Method.dora,
        modules_to_save=[TRAINABLE_MODULES[name] for name in config.trainable] or None,
        ensure_weight_tying="embed" in config.trainable,  # a tied LM head trains with the embeddings
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_trainer(model, tokenizer, train_rows, eval_rows, config: TrainConfig, precision: Precision, format: str,
                  out: Path, *, resuming: bool, callbacks: Sequence[Any] = ()):  # fmt: skip
    import torch
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    has_eval = eval_rows is not None
    args = SFTConfig(
        output_dir=str(out / CHECKPOINTS),
        seed=config.seed,
        data_seed=config.seed,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps (transformers 5)
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        optim=config.optim,
        bf16=precision is Precision.bf16,
        fp16=precision is Precision.fp16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=config.gradient_checkpointing,
        ddp_find_unused_parameters=False,  # every trainable weight takes part in every forward of a text model
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_eval and config.eval_steps else "no",
        eval_steps=config.eval_steps,
        eval_on_start=has_eval and config.eval_at_start and not resuming,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        max_length=config.max_length,
        packing=config.packing,
        packing_strategy=config.packing_strategy,
        completion_only_loss=config.completion_only_loss and has_prompt(format),
        assistant_only_loss=False,  # messages become prompt/completion pairs instead (train/data.py)
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        peft_config=lora_config(config) if config.adapter else None,
        callbacks=[ThroughputMeter(), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RichProgress())
    return trainer


def merged_dtype(config: TrainConfig, precision: Precision) -> str:
    """--merged-dtype, with auto resolved to the dtype the adapter was trained against (compute_dtype): the base's
    dtype under lora/dora, the 4-bit layers' compute dtype under qlora."""
    if config.merged_dtype != "auto":
        return config.merged_dtype
    if config.method is Method.qlora:
        return compute_dtype(precision)
    return "bfloat16" if precision is Precision.bf16 else "float32"


def merge_adapter(base_path: str, adapter_dir: Path, dtype: str, quantization=None, model_config=None):
    """The adapter merged into the base in `dtype`: a fresh load of the original checkpoint, or, given the QLoRA
    quantization config, the same 4-bit NF4 base the adapter was trained on, dequantized (peft issues #2105 and
    #1080: an adapter trained on NF4 weights partly corrects their quantization error, so merging it into the
    original weights gives a model that differs from the one trained and evaluated). Never merged into 4-bit
    weights: rounding the merged weights back to NF4 would lose most of the update. model_config: the base's config
    with scaled RoPE (train/rope.py), so merged/config.json carries the scaling."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if quantization is None:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype), config=copy.deepcopy(model_config))
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quantization, dtype=getattr(torch, dtype),
                                                    config=copy.deepcopy(model_config),
                                                    device_map="cuda:0" if torch.cuda.is_available() else "cpu")  # fmt: skip
        base = base.dequantize(dtype=getattr(torch, dtype))
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def save_merged(merged, adapter_dir: Path, merged_dir: Path) -> None:
    """A plain model folder with the tokenizer, for `datagen generate --model OUT/merged` and vLLM."""
    from transformers import AutoTokenizer

    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    merged.save_pretrained(str(merged_dir))
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(merged_dir))


def token_eval_loss(model, dataset, collator, batch_size: int) -> float:
    """Mean cross-entropy per learned token (labels != -100) of TRL's tokenized eval split, in order: one metric for
    the trained model and its merge, independent of how the batches fall."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            inputs = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            # no cache: with one, transformers skips its packed-sequence mask and packed documents would see each other
            logits = model(**inputs, use_cache=False).logits[:, :-1].float()
            labels = batch["labels"][:, 1:].to(logits.device)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum").item()
            tokens += int((labels != -100).sum())
    model.train(was_training)
    return total / tokens


def peak_memory_bytes() -> int:
    """CUDA: the most memory tensors held at once; CPU: the process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


# --- Callbacks ---------------------------------------------------------------------------------------------------------


class ThroughputMeter(TrainerCallback):
    """Training tokens per second of pure step time (evaluation and checkpointing excluded), for this process's
    session: TRL counts the non-padding tokens of every micro-batch, gathered over processes, in `num_tokens`."""

    def __init__(self):
        self.tokens = 0
        self.seconds = 0.0
        self._started: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
        if state.global_step >= state.max_steps:
            control.should_log = True  # so the last step's token count is logged

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and "num_tokens" in logs:
            self.tokens = int(logs["num_tokens"])


class RichProgress(TrainerCallback):
    """datagen's progress bar (steps, rate, ETA) with the latest loss in the status field; main process only."""

    def __init__(self):
        self.bar = None
        self.task = None
        self.status = ""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from datagen.console import progress

            self.bar = progress("steps")
            self.bar.start()
            self.task = self.bar.add_task("training", total=state.max_steps, completed=state.global_step, status="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step, status=self.status)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            if "loss" in logs:
                self.status = f"loss {logs['loss']:.3f}"
            if "eval_loss" in logs:
                self.status += f" eval {logs['eval_loss']:.3f}"
            self.bar.update(self.task, status=self.status)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

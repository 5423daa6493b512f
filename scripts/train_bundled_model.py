"""Train Tandem's bundled default model, ``models/tandem-tiny``, from scratch.

The model is a small Llama-architecture causal LM (grouped-query attention) trained
on the fortune cookie files that the Debian packages ``fortunes`` and
``fortunes-min`` install under ``/usr/share/games/fortunes``. It exists so that
Tandem can serve *something* that answers in recognisable English without any
download; it knows nothing beyond those quotations.

Stages (each a sub-command; ``all`` runs them in order):

1. ``prepare`` (CPU, seconds): read every plain-text fortune file, split the
   entries on ``%`` lines, hold out ``--val-fraction`` of them, train a byte-level
   BPE tokenizer (``<s>`` = bos, ``</s>`` = eos, ``<s>`` added on encode) and write
   the tokenizer and the token ids of ``<s> fortune </s>`` documents to
   ``--work-dir``.
2. ``train`` (GPU if present): pack the training documents into sequences of
   ``--seq-len`` tokens, train ``LlamaForCausalLM`` with AdamW, linear warm-up and
   a cosine learning-rate decay under bf16 autocast, once per value of
   ``--epochs``; keep the weights with the lowest validation loss over all runs
   and write them (float32 safetensors), the tokenizer and ``train_log.json`` to
   ``--out``.
3. ``sample``: greedy and sampled completions of a few prompts, for the model card.

Retrain (after ``apt-get install fortunes fortunes-min``)::

    python scripts/train_bundled_model.py all --out models/tandem-tiny
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

BOS, EOS = "<s>", "</s>"
SKIP_SUFFIXES = (".dat", ".u8")
OVERSTRIKE = re.compile(r".\x08")  # "_\bW" (underlined W) -> "W"
SAMPLE_PROMPTS = ("The meaning of life is", "A computer is", "Love is")


def load_fortunes(data_dir: Path, min_letter_ratio: float = 0.6) -> list[str]:
    """Return the fortunes of every plain-text file in ``data_dir``, in file order.

    Skips ``.dat`` index files, ``.u8`` links and other symlinks; entries are
    separated by lines holding only ``%``. Backspace overstriking is removed and
    entries whose letters and spaces make up less than ``min_letter_ratio`` of the
    characters (ASCII art) are dropped.

    Raises:
        FileNotFoundError: ``data_dir`` holds no fortune file.
    """
    paths = [
        p
        for p in sorted(data_dir.iterdir())
        if p.is_file() and not p.is_symlink() and not p.name.endswith(SKIP_SUFFIXES)
    ]
    if not paths:
        raise FileNotFoundError(f"no fortune files in {data_dir}; apt-get install fortunes fortunes-min")
    docs: list[str] = []
    for path in paths:
        text = OVERSTRIKE.sub("", path.read_text(encoding="utf-8", errors="replace"))
        for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            entry = entry.strip("\n").rstrip()
            if not entry.strip():
                continue
            letters = sum(c.isalpha() or c == " " for c in entry)
            if letters / len(entry) >= min_letter_ratio:
                docs.append(entry)
    return docs


def train_tokenizer(docs: list[str], vocab_size: int, max_len: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ids ``<s>`` = 0 and ``</s>`` = 1.

    Encoding prepends ``<s>`` (a TemplateProcessing post-processor), so a plain
    prompt starts the way every training document does.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=max_len
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save tokenizer.json + tokenizer_config.json under the class name every transformers version knows."""
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes "TokenizersBackend"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def encode_docs(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode each doc as ``<s> doc </s>``.

    Returns:
        ``(ids, offsets)``: int32 ``[total_tokens]`` and int64 ``[len(docs) + 1]``;
        document ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.
    """
    encoded = tokenizer(docs, add_special_tokens=True)["input_ids"]
    seqs = [np.asarray([*e, tokenizer.eos_token_id], dtype=np.int32) for e in encoded]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    return np.concatenate(seqs), offsets


def cmd_prepare(args: argparse.Namespace) -> None:
    """Stage 1: fortunes -> tokenizer + token ids under ``args.work_dir``."""
    docs = load_fortunes(Path(args.data_dir))
    order = list(range(len(docs)))
    random.Random(args.seed).shuffle(order)
    num_val = max(1, round(len(docs) * args.val_fraction))
    val_docs = [docs[i] for i in order[:num_val]]
    train_docs = [docs[i] for i in order[num_val:]]
    tokenizer = train_tokenizer(train_docs, args.vocab_size, args.max_position_embeddings)
    work = Path(args.work_dir)
    save_tokenizer(tokenizer, work / "tokenizer")
    meta: dict[str, Any] = {"data_dir": str(args.data_dir), "seed": args.seed}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        ids, offsets = encode_docs(tokenizer, split_docs)
        np.save(work / f"{split}_ids.npy", ids)
        np.save(work / f"{split}_offsets.npy", offsets)
        meta[split] = {"docs": len(split_docs), "tokens": int(ids.size), "chars": sum(map(len, split_docs))}
    (work / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))


def pack(ids: np.ndarray, offsets: np.ndarray, order: np.ndarray, seq_len: int) -> torch.Tensor:
    """Concatenate documents in ``order`` and cut into int64 ``[n, seq_len]`` rows (tail dropped)."""
    stream = np.concatenate([ids[offsets[i] : offsets[i + 1]] for i in order])
    n = stream.size // seq_len
    return torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)


def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``peak * min_ratio`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_config(tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace) -> LlamaConfig:
    """Llama config with grouped-query attention and tied embeddings, float32 weights."""
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(**kwargs)  # rope_theta: transformers 5 moves it into rope_parameters
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    return config


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, val: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token loss (nats per token) over the packed validation rows ``[n, seq_len]``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, val.shape[0], batch_size):
        batch = val[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        total += loss.item() * batch.shape[0]
        count += batch.shape[0]
    model.train()
    return total / count


def train_once(
    data: dict[str, np.ndarray], config: LlamaConfig, epochs: int, budget_s: float, args: argparse.Namespace
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train one model from a fixed seed for ``epochs`` epochs or ``budget_s`` seconds.

    The schedule length is ``epochs`` epochs, shortened after ``calib`` steps if the
    measured step time says it would not fit in ``budget_s``.

    Returns:
        ``(best_state_dict, log)``: CPU weights at the lowest validation loss, and
        a JSON-able record of the run.
    """
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    with device:  # build the weights directly on the target device
        model = LlamaForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    n_train_docs = data["train_offsets"].size - 1
    val = pack(data["val_ids"], data["val_offsets"], np.arange(data["val_offsets"].size - 1), args.seq_len)
    steps_per_epoch = data["train_ids"].size // args.seq_len // args.batch_size
    total = min(args.max_steps or 10**9, epochs * steps_per_epoch)
    log: dict[str, Any] = {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "evals": [], "train": []}
    best_val, best_state, step, calib, t0 = float("inf"), {}, 0, min(20, total), time.time()
    while step < total:
        rows = pack(data["train_ids"], data["train_offsets"], rng.permutation(n_train_docs), args.seq_len)
        rows = rows[torch.from_numpy(rng.permutation(rows.shape[0]))]
        for start in range(0, rows.shape[0] - args.batch_size + 1, args.batch_size):
            if step >= total:
                break
            batch = rows[start : start + args.batch_size].to(device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, args.warmup, args.lr, args.min_lr_ratio)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == calib:
                per_step = (time.time() - t0) / step
                total = max(min(total, int(budget_s / per_step)), calib)
                log["planned_steps"] = total
            if step % args.log_every == 0 or step == total:
                log["train"].append([step, round(loss.item(), 4)])
            if step % args.eval_every == 0 or step == total:
                val_loss = evaluate(model, val, args.batch_size, device)
                log["evals"].append([step, round(loss.item(), 4), round(val_loss, 4)])
                print(
                    f"epochs={epochs} step {step}/{total} train {loss.item():.4f} val {val_loss:.4f}",
                    flush=True,
                )
                if val_loss < best_val:
                    best_val = val_loss
                    best_state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
                    log.update(
                        best_step=step,
                        best_val_loss=round(val_loss, 4),
                        best_train_loss=round(loss.item(), 4),
                    )
    log.update(
        steps=step, tokens_seen=step * args.batch_size * args.seq_len, wall_s=round(time.time() - t0, 1)
    )
    return best_state, log


def cmd_train(args: argparse.Namespace) -> None:
    """Stage 2: train once per ``--epochs`` value and save the best model to ``--out``."""
    work, out = Path(args.work_dir), Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    data = {f"{s}_{k}": np.load(work / f"{s}_{k}.npy") for s in ("train", "val") for k in ("ids", "offsets")}
    config = build_config(tokenizer, args)
    epoch_list = [int(e) for e in args.epochs.split(",")]
    runs, best = [], None
    t0 = time.time()
    for i, epochs in enumerate(epoch_list):
        budget = (args.max_minutes * 60 - (time.time() - t0)) / (len(epoch_list) - i)
        state, log = train_once(data, config, epochs, budget, args)
        runs.append(log)
        if best is None or log["best_val_loss"] < best[1]["best_val_loss"]:
            best = (state, log)
    assert best is not None
    model = LlamaForCausalLM(config)
    model.load_state_dict(best[0])
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(work / "tokenizer" / name, out / name)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    summary = {
        "chosen_epochs": best[1]["epochs"],
        "num_parameters": n_params,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "hyperparameters": {k: v for k, v in vars(args).items() if k != "func"},
        "data": json.loads((work / "meta.json").read_text()),
        "total_wall_s": round(time.time() - t0, 1),
        "runs": runs,
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


def cmd_sample(args: argparse.Namespace) -> None:
    """Stage 3: print greedy and sampled (seeded) completions of the sample prompts."""
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    model = AutoModelForCausalLM.from_pretrained(args.out).float().eval()
    for prompt in SAMPLE_PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        greedy = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        torch.manual_seed(args.seed)
        sampled = model.generate(**inputs, max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.95)
        for kind, ids in (("greedy", greedy), ("sampled", sampled)):
            print(json.dumps({"prompt": prompt, kind: tokenizer.decode(ids[0], skip_special_tokens=True)}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["prepare", "train", "sample", "all"])
    p.add_argument("--data-dir", default="/usr/share/games/fortunes")
    p.add_argument("--work-dir", default=".train", help="tokenizer and token ids from 'prepare'")
    p.add_argument("--out", default="models/tandem-tiny")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=704)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--max-position-embeddings", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--epochs", default="6,12,24,48", help="comma list: one run each, best val loss kept")
    p.add_argument("--max-steps", type=int, default=0, help="cap per run (0: none)")
    p.add_argument("--max-minutes", type=float, default=5.0, help="wall budget for all runs")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    stages = ["prepare", "train", "sample"] if args.stage == "all" else [args.stage]
    for stage in stages:
        {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample}[stage](args)


if __name__ == "__main__":
    main()

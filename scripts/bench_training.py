#!/usr/bin/env python
"""Training throughput: one fine-tune epoch of raysweep's loop vs a plain Hugging Face
Trainer with the same settings (SGD, constant lr, clipping, batch size, response-only loss,
same examples in the same order). Writes JSON and prints a markdown row.

    python scripts/bench_training.py                                   # CPU, tiny GPT-2
    python scripts/bench_training.py --arch llama-2-7b --device cuda --engine deepspeed --precision fp16

On a GPU the row includes model FLOPs utilisation: 6 x params x tokens / time / peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scoring import build  # noqa: E402  (same model builders as the scoring benchmark)

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny", choices=["tiny", "gpt2-124m", "llama-2-7b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--engine", default="torch", choices=["torch", "deepspeed"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--examples", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--skip-trainer", action="store_true")
    ap.add_argument("--out", default="benchmarks_out/training.json")
    args = ap.parse_args()

    from raysweep.methods import nll_loss
    from raysweep.spec import FinetuneConfig, TrainEngine
    from raysweep.tasks import prepare_task
    from raysweep.train import build_batches, make_optimizer, train_epoch

    load_dtype = torch.float16 if (args.precision == "fp16" and args.engine == "deepspeed") else torch.float32
    model, tok = build(args.arch, args.device, load_dtype)
    exs = []
    for t in ("compare", "capital", "word_order", "hypernym", "sentiment", "same_word"):
        exs += prepare_task(t, seed=1234, cap=args.examples // 6, max_chars=2048).split("train")
    gold = [e.gold for e in exs]
    cfg = FinetuneConfig(optimizer="sgd", lr=args.lr, batch_size=args.batch_size, grad_clip=1.0)
    batches = build_batches(tok, model, exs, gold, args.batch_size, random.Random(0))
    real_tokens = int(sum(int(b.attention_mask.sum()) for b in batches))

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    stepper = make_optimizer(model, cfg, TrainEngine(engine=args.engine, precision=args.precision))
    if args.engine == "torch" and args.precision == "bf16":
        model.to(torch.bfloat16)
    train_epoch(model, stepper, batches[:2], nll_loss)  # warm-up
    sync()
    t = time.perf_counter()
    train_epoch(model, stepper, batches, nll_loss)
    sync()
    t_ours = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    res = {
        "arch": args.arch,
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
        "engine": args.engine,
        "precision": args.precision,
        "examples": len(exs),
        "batch_size": args.batch_size,
        "tokens": real_tokens,
        "raysweep_tokens_per_s": real_tokens / t_ours,
        "params": params,
    }
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak:
            res["training_mfu"] = 6 * params * real_tokens / t_ours / peak

    if not args.skip_trainer:
        del stepper, model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        from transformers import Trainer, TrainingArguments

        model, tok = build(args.arch, args.device, torch.float32 if args.precision != "bf16" else torch.bfloat16)

        class Rows(torch.utils.data.Dataset):
            # The very batches raysweep trained on, one row at a time, unpadded.
            def __init__(self):
                self.rows = []
                for b in batches:
                    for r in range(b.input_ids.shape[0]):
                        n = int(b.attention_mask[r].sum())
                        self.rows.append({"input_ids": b.input_ids[r, :n], "labels": b.labels[r, :n]})

            def __len__(self):
                return len(self.rows)

            def __getitem__(self, i):
                return self.rows[i]

        pad = tok.pad_token_id

        def collate(rows):
            width = max(len(r["input_ids"]) for r in rows)
            ids = torch.full((len(rows), width), pad)
            lab = torch.full((len(rows), width), -100)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                n = len(r["input_ids"])
                ids[i, :n], lab[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
            # raysweep's labels are already next-token targets; HF shifts internally, so
            # hand it the unshifted form: the target at position p becomes label p+1.
            shifted = torch.full_like(lab, -100)
            shifted[:, 1:] = lab[:, :-1]
            return {"input_ids": ids, "attention_mask": mask, "labels": shifted}

        targs = TrainingArguments(
            output_dir="/tmp/raysweep-bench-trainer",
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            num_train_epochs=1,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            fp16=args.precision == "fp16",
            bf16=args.precision == "bf16",
            dataloader_num_workers=0,
            use_cpu=not args.device.startswith("cuda"),
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=Rows(), data_collator=collate)
        # Sequential order, like raysweep's pre-shuffled batches.
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        sync()
        t = time.perf_counter()
        trainer.train()
        sync()
        t_hf = time.perf_counter() - t
        res["hf_trainer_tokens_per_s"] = real_tokens / t_hf
        res["speedup_vs_hf_trainer"] = t_hf / t_ours

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(
        f"| {res['arch']} | {res['device']} | {res['engine']} {res['precision']} | {res['tokens']} | {res['raysweep_tokens_per_s']:.0f} | {res.get('hf_trainer_tokens_per_s', float('nan')):.0f} | {res.get('speedup_vs_hf_trainer', float('nan')):.2f}x | {res.get('training_mfu', float('nan')):.3f} |"
    )


if __name__ == "__main__":
    main()

"""End to end on a small real example: a teacher over real text, its top-K targets in a store,
verified and read back.

1. Train a byte-level BPE tokenizer on Python standard-library source files (real text that is
   on every machine; nothing is downloaded).
2. Build a small Llama-style causal LM from a ``transformers`` config and train it for a few
   steps on that text, so that its next-token distributions are peaked like a real teacher's.
3. Run it over held-out text and keep, for every token, its top-K ids and log-probabilities in
   a logitcache store (``StoreWriter.add_logits``: log-softmax and top-K in Rust).
4. Verify every checksum, reopen the store and read a padded batch back; print a summary.
5. Fit a smaller student on the stored targets for a few steps with ``KDLoss`` (top-K
   forward KL mixed with cross-entropy) and print its loss.

Run: ``python examples/quickstart.py [--out DIR] [--steps N]`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

import logitcache as lc


def stdlib_files(limit_bytes: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(root.glob("*.py")):
        files.append(f)
        total += f.stat().st_size
        if total >= limit_bytes:
            break
    return files


def train_tokenizer(files: list[Path], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="store directory (default: temp)")
    parser.add_argument("--steps", type=int, default=150, help="teacher training steps")
    parser.add_argument("--k", type=int, default=32, help="top-K kept per token")
    parser.add_argument("--student-steps", type=int, default=30, help="distillation steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()

    files = stdlib_files(1_500_000)
    vocab_size = 4096
    tokenizer = train_tokenizer(files, vocab_size)
    ids = np.concatenate(
        [np.array(tokenizer.encode(f.read_text(errors="replace")).ids) for f in files]
    )
    split = int(len(ids) * 0.95)
    train_ids, held_out = torch.from_numpy(ids[:split]), ids[split:]
    print(f"tokenizer: {vocab_size} tokens, {len(ids):,} tokens of stdlib source")

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    teacher = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    seq, batch = 128, 8
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - seq - 1, (batch,))
        x = torch.stack([train_ids[s : s + seq] for s in starts])
        loss = teacher(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"teacher step {step:4d}  loss {loss.item():.3f}")
    teacher.eval()

    out = args.out or Path(tempfile.mkdtemp(prefix="logitcache-quickstart-")) / "store"
    n_seq = min(64, len(held_out) // seq)
    with (
        torch.no_grad(),
        lc.StoreWriter(
            out,
            vocab_size=vocab_size,
            k=args.k,
            teacher=teacher,
            tokenizer={
                "name": "stdlib-bpe-4096",
                "vocab_fingerprint": lc.vocab_fingerprint(tokenizer.get_vocab()),
            },
            metadata={"example": "quickstart", "teacher_steps": args.steps},
            mode="w",
        ) as writer,
    ):
        for i in range(n_seq):
            x = torch.from_numpy(held_out[i * seq : (i + 1) * seq]).long()
            logits = teacher(input_ids=x[None]).logits[0]
            writer.add_logits(i, x, logits)
    report = lc.verify_store(out)
    store = lc.open_store(out, expect_vocab_size=vocab_size)
    padded = store.read_batch(store.sample_ids()[:8])
    # The targets' summary, and the check that row t holds the prediction of token t + 1.
    stats = lc.target_stats(store)
    agree = stats["agreement"]
    bytes_total = sum(s["bytes"] for s in store.meta["shards"])
    print(f"store: {out}")
    print(f"  samples {len(store)}, positions {store.num_positions:,}, K = {store.k}")
    print(
        f"  {bytes_total / store.num_positions:.1f} bytes per token "
        f"(raw int32 ids + float16 log-probs would be {store.k * 6 + 4})"
    )
    print(f"  verify: {'OK' if report['ok'] else report['problems']}")
    print(f"  read_batch of 8: ids {padded.topk_ids.shape}, mask {padded.mask.shape}")
    print(
        f"  teacher top-1 = next token on {agree[1]['top1']:.1%} of positions (= the same "
        f"token on {agree[0]['top1']:.1%}); top-{store.k} mass {stats['target_mass']:.3f} "
        "on average"
    )
    if stats["warning"]:
        print(f"  WARNING: {stats['warning']}")

    # 5. A few distillation steps of a smaller student, straight from the store.
    student = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    loss_fn = lc.KDLoss(divergence="forward_kl", kd_weight=0.5)
    ids_all = store.sample_ids()
    for step in range(args.student_steps):
        b = store.read_batch(ids_all[(step * 8) % len(ids_all) :][:8])
        input_ids = torch.from_numpy(b.input_ids).long()
        # Row t of the targets predicts token t+1: labels are the inputs shifted left. The
        # last position of a record has no next token (the padding after a shorter record
        # is not one): -100 there and on the padding ignores those rows.
        labels = torch.full_like(input_ids, -100)
        labels[:, :-1] = input_ids[:, 1:]
        positions = torch.arange(input_ids.shape[1])
        labels[positions >= torch.from_numpy(b.lengths)[:, None] - 1] = -100
        batch = {
            "labels": labels,
            "topk_ids": torch.from_numpy(b.topk_ids).long(),
            "topk_logprobs": torch.from_numpy(b.topk_logprobs),
        }
        loss = loss_fn(student(input_ids=input_ids).logits, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.student_steps - 1:
            print(f"student step {step:3d}  KD+CE loss {loss.item():.3f}")
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

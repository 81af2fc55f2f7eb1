"""sclora demo: SC-LoRA on SmolLM2-135M-Instruct with real data, offline, in a few minutes on 2 CPU cores.

    make demo        # or: python examples/demo.py [--samples 32 --seq-len 128 --out runs/demo]

1. D+ = scientific prose (aclsum papers), D- = world-knowledge trivia (Red-DiscordBot lists), both
   read out of PyPI wheels; statistics of every projection's outputs, saved to disk.
2. A beta sweep from the saved statistics (no more forward passes): how much of D+ and of D- output
   energy the initial adapter subspace captures, tr(Q^T Cov Q) / tr(Cov), averaged over modules.
3. The beta=0.8 model: logits at init equal the base model's; a few AdamW steps on D+; exported as a
   plain LoRA adapter that reproduces the fine-tuned logits on the untouched base model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from peft import PeftModel

import sclora
from sclora.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_data import paper_texts, token_windows, trivia_texts  # noqa: E402

SAMPLED_LAYERS = (0, 10, 20, 29)


def batches(windows, batch_size=8):
    return [{"input_ids": torch.tensor(windows[i:i + batch_size]),
             "attention_mask": torch.ones(len(windows[i:i + batch_size]), len(windows[0]), dtype=torch.long)}
            for i in range(0, len(windows), batch_size)]


def energy_fraction(q, cov):
    return (torch.einsum("ir,ij,jr->", q, cov, q) / cov.trace()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32, help="samples per set")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    model, tokenizer = load_model()
    plus = token_windows(tokenizer, paper_texts(), args.samples, args.seq_len)
    minus = token_windows(tokenizer, trivia_texts(), args.samples, args.seq_len)
    print(f"D+: {len(plus)} x {args.seq_len} tokens of aclsum papers; D-: {len(minus)} x {args.seq_len} of trivia")

    t = time.perf_counter()
    plus_stats = sclora.collect_covariances(model, batches(plus), desc="D+ statistics")
    minus_stats = sclora.collect_covariances(model, batches(minus), desc="D- statistics")
    t_stats = time.perf_counter() - t
    plus_stats.save(out / "plus.safetensors")
    minus_stats.save(out / "minus.safetensors")
    print(f"statistics: {t_stats:.1f} s, {len(plus_stats)} modules in {len(plus_stats.sums)} stored matrices")

    # Output covariances of a few layers, for the diagnostics below (before any weight is replaced).
    probe = [n for n in plus_stats if any(f"layers.{i}." in n for i in SAMPLED_LAYERS)]
    cov_p = {n: plus_stats[n].double() for n in probe}
    cov_m = {n: minus_stats[n].double() for n in probe}

    rows = []
    for beta in (0.0, 0.5, 0.8, 0.99, 1.0):
        fresh, _ = load_model()
        p = sclora.CovarianceStats.load(out / "plus.safetensors")
        m = sclora.CovarianceStats.load(out / "minus.safetensors")
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", sclora.NonUniqueSubspaceWarning)
            peft_model = sclora.get_sclora_model(fresh, sclora.SCLoRAConfig(r=args.r, beta=beta), p, m,
                                                 show_progress=False)
        t_init = time.perf_counter() - t
        inner = peft_model.base_model.model
        qs = {n: inner.get_submodule(n).lora_B["default"].weight.detach().double() for n in probe}
        e_plus = sum(energy_fraction(qs[n], cov_p[n]) for n in probe) / len(probe)
        e_minus = sum(energy_fraction(qs[n], cov_m[n]) for n in probe) / len(probe)
        rows.append({"beta": beta, "init_s": round(t_init, 2), "energy_plus": e_plus, "energy_minus": e_minus,
                     "non_unique_warning": any(issubclass(w.category, sclora.NonUniqueSubspaceWarning)
                                               for w in caught)})
        if beta == 0.8:
            kept = peft_model
    print(f"\nShare of output energy inside the initial adapter subspace (r={args.r}, mean over "
          f"{len(probe)} modules of layers {SAMPLED_LAYERS}):")
    print(f"{'beta':>6} {'D+ (learn)':>12} {'D- (keep)':>12} {'init (s)':>9}  note")
    for row in rows:
        note = "NonUniqueSubspaceWarning (ties)" if row["non_unique_warning"] else ""
        print(f"{row['beta']:>6} {row['energy_plus']:>12.4f} {row['energy_minus']:>12.4f} {row['init_s']:>9.1f}  {note}")

    ids = torch.tensor(plus[:2])
    with torch.no_grad():
        base_logits = model(ids).logits
        init_logits = kept(ids).logits
    init_gap = (init_logits - base_logits).abs().max().item()
    print(f"\nbeta=0.8: max |logit difference| at init vs the base model: {init_gap:.2e}")
    sclora.save_initial_adapter(kept, out / "initial_adapter")

    kept.train()
    opt = torch.optim.AdamW([p for p in kept.parameters() if p.requires_grad], lr=2e-4)
    for step, batch in enumerate(batches(plus[:16], 4)):
        loss = kept(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"train step {step}: D+ loss {loss.item():.4f}")
    kept.eval()
    with torch.no_grad():
        tuned_logits = kept(ids).logits
    sclora.export_lora(kept, out / "adapter")
    untouched, _ = load_model()
    reloaded = PeftModel.from_pretrained(untouched, out / "adapter")
    with torch.no_grad():
        export_gap = (reloaded(ids).logits - tuned_logits).abs().max().item()
    print(f"exported rank-{reloaded.peft_config['default'].r} plain LoRA adapter to {out / 'adapter'}; on the "
          f"untouched base it reproduces the fine-tuned logits to {export_gap:.2e}")
    summary = {"statistics_s": round(t_stats, 1), "sweep": rows, "init_logit_gap": init_gap,
               "export_logit_gap": export_gap}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

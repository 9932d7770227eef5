"""Paper 2's comparison: split fine-tuning against centralized fine-tuning, and what its
security costs.

Every method continues training SmolLM2-135M on the stdlib's documentation (``pydoc_data``
topics) and is measured by validation perplexity on held-out passages of it. Methods: full
fine-tuning and LoRA in one process (centralized); split by layers (the client's first
``cut`` layers frozen, the server's in its simulated enclave, attested, every frame between
them encrypted) with LoRA, LoRA + SPF and P-tuning v2; the masked method (split LoRA whose
server's frozen linear layers run on its host on masked inputs); and split LoRA without the
enclave, the reference of the security machinery's cost.

Per method: the validation metric, trainable parameters, tokens/s, bytes on the wire per step
(between the client and the server, measured on one more training step), what lives in the
enclave (parameters and the saved activations of one micro-batch, in bytes), the enclave's
seconds (attestation, session encryption, sealing) and, for the masked method, the online
(masking, host products, checks) and offline (mask precomputation) seconds per step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from phalanx.experiments.spec import ShortRuns
from phalanx.split.config import SERVER

METHODS: dict[str, dict] = {
    "full": {"trainable.method": "full"},
    "central_lora": {"trainable.method": "lora"},
    "split_lora": {"trainable.method": "lora", "split.mode": "layers"},
    "split_lora_spf": {"trainable.method": "lora+spf", "split.mode": "layers"},
    "split_ptuning": {"trainable.method": "ptuning", "split.mode": "layers"},
    "masked": {"trainable.method": "lora", "split.mode": "layers", "split.masked": True},
    "split_lora_plain": {"trainable.method": "lora", "split.mode": "layers", "enclave": False},
}
"""Each method's settings; every split one runs its server in the enclave unless ``enclave``
is false (the reference for the cost of the security machinery)."""

LR = {"full": 2e-4, "ptuning": 1e-2}  # else 2e-3: the usual rates of each kind of training


@dataclass(kw_only=True)
class SplitSpec(ShortRuns):
    """The scale of the comparison (simulator: every party in one process; ``stages`` is set
    by each method's split)."""

    steps: int = 30
    batch_size: int = 4
    seq_len: int = 128
    eval_batches: int = 4
    cut: int = 2
    methods: tuple[str, ...] = tuple(METHODS)

    @classmethod
    def quick(cls) -> SplitSpec:
        return cls(model="tiny", steps=3, seq_len=16, eval_batches=1, cut=1)


def settings(spec: SplitSpec, method: str, out: Path) -> list[str]:
    """The overrides of one method's run."""
    m = METHODS[method]
    kind = m["trainable.method"]
    lr = LR.get(kind, 2e-3)
    s = [f"model.name={json.dumps(spec.model)}", f"train.steps={spec.steps}",
         f"train.batch_size={spec.batch_size}", f"pipeline.micro_batches={spec.micro_batches}",
         f"data.seq_len={spec.seq_len}", f"train.eval_batches={spec.eval_batches}",
         "train.save=false", "train.progress=false", f"train.seed={spec.seed}",
         f"optim.lr={lr}", f"train.out_dir={json.dumps(str(out))}",
         f"trainable.method={json.dumps(kind)}"]
    if "split.mode" in m:
        s += [f"split.mode={json.dumps(m['split.mode'])}", f"split.cut={spec.cut}"]
        if m.get("enclave", True):
            s.append('split.enclave="simulated"')
        if m.get("split.masked"):
            s.append("split.masked=true")
    else:
        s.append("pipeline.stages=1")
    return [*s, *spec.extra]


def _cross_bytes(runtime) -> int:  # noqa: ANN001
    """Bytes sent so far on the links between the client's stages and the server's."""
    return sum(ch.bytes_sent for w in runtime.workers for peer, ch in w.channels.items()
               if (w.me == SERVER) != (peer == SERVER))


def _saved_bytes(stage: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for one forward of ``stage`` on ``x`` (the activations a training
    step holds inside until its backward), each storage counted once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage(x)
    return sum(seen.values())


def _inside(trainer, spec: SplitSpec) -> dict:  # noqa: ANN001
    """What lives in the enclave: the server stage's parameters (for the masked method, those
    it does not outsource) and the activations of one micro-batch, in bytes."""
    worker = next((w for w in trainer.runtime.workers if w.me == SERVER), None)
    if worker is None or trainer.cfg.split.enclave == "none":
        return {}
    masked = trainer.pipe.masked  # its outsourced weights are no longer the stage's parameters
    params = sum(p.numel() * p.element_size() for p in worker.stage.parameters())
    outsourced = masked.bytes().outsourced if masked is not None else 0
    rows = spec.batch_size // spec.micro_batches
    hidden = int(trainer.pipe.loaded.model.config.hidden_size)
    ref = next(worker.stage.parameters())
    x = torch.randn(rows, spec.seq_len, hidden, device=ref.device, dtype=ref.dtype,
                    requires_grad=True)
    return {"enclave_param_bytes": params, "host_param_bytes": outsourced,
            "enclave_activation_bytes": _saved_bytes(worker.stage, x)}


def _sealing(trainer) -> dict:  # noqa: ANN001
    """Seconds and bytes of sealing the server's checkpoint (parameters and optimizer state),
    as every checkpoint of the run does."""
    from phalanx.train.checkpoint import stage_tensors

    store = trainer.pipe.stores.get(SERVER)
    worker = next((w for w in trainer.runtime.workers if w.me == SERVER), None)
    if store is None or worker is None:
        return {}
    t0 = time.perf_counter()
    blob = store.dump(stage_tensors(worker))
    return {"seal_checkpoint_s": time.perf_counter() - t0, "sealed_checkpoint_bytes": len(blob)}


def measure(spec: SplitSpec, method: str, out: Path) -> dict:
    """Train one method, then measure one more step; its record."""
    from phalanx.config import load_config
    from phalanx.train import Config, Trainer

    cfg = load_config(Config, None, settings(spec, method, out))
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
        rt, pipe = trainer.runtime, trainer.pipe
        trainable = sum(p.numel() for w in rt.workers for n, p in w.stage.named_parameters()
                        if p.requires_grad and n in w.stage.names)
        masked = pipe.masked
        offline = 0.0
        if masked is not None:  # this step's masks drawn ahead (offline), then used (online)
            masked.stats.reset()
            masked.precompute(spec.batch_size // spec.micro_batches, spec.seq_len,
                              count=spec.micro_batches)
            offline = masked.stats.offline_s
            masked.stats.online_s = 0.0
        before = _cross_bytes(rt)
        t0 = time.perf_counter()
        rt.train_step(spec.steps, trainer.data.batch(spec.steps, spec.batch_size))
        step_s = time.perf_counter() - t0
        if masked is not None:
            masking = {"masking_offline_s_per_step": offline,
                       "masking_online_s_per_step": masked.stats.online_s,
                       "masking_pool_misses": masked.stats.pool_misses}
        rec = {
            "method": method, "val_metric": summary["val_ppl_end"],
            "val_metric_name": "validation perplexity (lower is better)",
            "val_ppl_start": summary["val_ppl_start"], "trainable_params": trainable,
            "tokens_per_s": summary["tokens_per_s"],
            "wire_bytes_per_step": _cross_bytes(rt) - before, "step_s": step_s,
            "wall_s": summary["wall_s"], **_inside(trainer, spec),
        }
        if pipe.enclave is not None:
            rec.update(_sealing(trainer))
            rec["enclave_s"] = pipe.enclave.cost()
        if masked is not None:
            rec.update(masking)
    finally:
        trainer.close()
    return rec


def derived(rows: dict[str, dict]) -> dict:
    """The comparisons the targets name."""
    out: dict = {}
    lora, spf = rows.get("central_lora"), rows.get("split_lora_spf")
    if lora and spf:
        out["spf_vs_central_lora"] = spf["val_metric"] / lora["val_metric"] - 1
    sealed, plain = rows.get("split_lora"), rows.get("split_lora_plain")
    if sealed and plain:
        out["security_cost_tokens_per_s"] = 1 - sealed["tokens_per_s"] / plain["tokens_per_s"]
        e = sealed.get("enclave_s", {})
        spent = e.get("crypto_s", 0.0) + e.get("attest_s", 0.0) + e.get("seal_s", 0.0)
        out["security_share_of_wall"] = spent / sealed["wall_s"]
    if sealed and rows.get("masked"):
        out["masked_cost_tokens_per_s"] = 1 - rows["masked"]["tokens_per_s"] / \
            sealed["tokens_per_s"]
    return out


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "n/a"
    return "" if v is None else str(v)


def table(rows: list[dict], extra: dict) -> str:
    cols = ["method", "val_metric", "trainable_params", "tokens_per_s", "wire_bytes_per_step",
            "enclave_param_bytes", "enclave_activation_bytes", "host_param_bytes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    lines.append("")
    lines += [f"- {k}: {_fmt(v)}" for k, v in extra.items()]
    for r in rows:
        if "masking_online_s_per_step" in r:
            lines.append(f"- {r['method']}: masking online {r['masking_online_s_per_step']:.3g} "
                         f"s/step, offline (mask precomputation) "
                         f"{r['masking_offline_s_per_step']:.3g} s/step")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    a.bar(names, [r["val_metric"] for r in rows])
    a.set_ylabel("validation perplexity")
    b.bar(names, [r["tokens_per_s"] for r in rows], color="tab:orange")
    b.set_ylabel("tokens/s")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(spec: SplitSpec, out: Path, fresh: bool = False) -> dict:
    """Every method of ``spec`` (a method whose record was written with the same settings is
    reused unless ``fresh``); writes ``summary.json``, ``table.md`` and ``split.png``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, method in enumerate(spec.methods, 1):
        run_dir = out / "runs" / method
        record, wanted = run_dir / "record.json", settings(spec, method, run_dir)
        old = json.loads(record.read_text()) if record.is_file() and not fresh else None
        if old is not None and old.get("settings") == wanted:
            rows.append(old)
            print(f"[{k}/{len(spec.methods)}] {method}: reused", file=sys.stderr, flush=True)
            continue
        print(f"[{k}/{len(spec.methods)}] {method} ...", file=sys.stderr, flush=True)
        rows.append({**measure(spec, method, run_dir), "settings": wanted})
        record.write_text(json.dumps(rows[-1], indent=2) + "\n")
        print(f"    val ppl {rows[-1]['val_metric']:.3f}, {rows[-1]['tokens_per_s']:.0f} tok/s",
              file=sys.stderr, flush=True)
    extra = derived({r["method"]: r for r in rows})
    summary = {"spec": {k: v for k, v in vars(spec).items()}, "methods": rows, **extra}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
    (out / "table.md").write_text(table(rows, extra))
    plot(rows, out / "split.png")
    return summary

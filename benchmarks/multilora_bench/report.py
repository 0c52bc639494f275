"""The benchmark's outputs: JSON (every number, the machine, versions), a markdown table, a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from multilora_bench.harness import IDLE_LOAD, RAM_FRACTION

COLUMNS = (
    "| config | seq | dtype | K | method | kernel | tokens/s | vs peft-padded | vs peft-packed | steady s "
    "| peak RSS MB | est. MB | CUDA MB | GFLOP/s | % peak | pad % | grouped % | final loss | Δloss |"
)


def fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _method(row: dict[str, Any]) -> str:
    unpacked = row["method"] == "pack" and row.get("packing") is False
    passes = row.get("max_tokens_per_pass")
    shown = "" if passes is None else " (1 pass)" if passes >= 10**6 else f" (≤{passes}/pass)"
    ckpt = " +ckpt" if row.get("checkpointed") else ""
    return row["method"] + (" (unpacked)" if unpacked else "") + shown + ckpt


def markdown(report: dict[str, Any]) -> str:
    info, cfg = report["machine"], report["config"]
    busy = info["load_average_at_start"] >= IDLE_LOAD
    peaks = ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in report["peak_flops"].items())
    lines = [
        f"# Multi-LoRA benchmark ({info['device']})",
        "",
        f"{info['date']} · {info.get('gpu') or info['cpu_model']} · {info['cores']} cores"
        f" · {info['ram_gb']} GB RAM · torch {info['torch']} · transformers {info['transformers']}"
        f" · peft {info['peft']}",
        "",
        f"Matmul peak (best of {cfg['peak_repeats']} {cfg['peak_n']}² matmuls): {peaks}. Batch "
        f"{cfg['batch_size']} documents per adapter and step, log-normal lengths (median "
        f"{cfg['median_tokens']} tokens) up to seq, LoRA r={cfg['r']} alpha={cfg['alpha']} on "
        f"{cfg['targets']};"
        f" {cfg['steps']} steps, the first {cfg['warmup']} per adapter excluded."
        + (" SMOKE RUN." if cfg.get("smoke") else ""),
        "",
        f"1-minute load average: {info['load_average_at_start']:.2f} at start, "
        f"{info['load_average_at_end']:.2f} at end (includes this benchmark's own processes)"
        + (" — **the machine was busy: timings are not trustworthy**." if busy else "."),
        "",
        COLUMNS,
        "|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        head = f"| {r['config']} | {r['seq']} | {r['dtype']} | {r['k']} | {_method(r)} "
        head += f"| {r.get('kernel') or ''} "
        if r["status"] != "ok":
            why = r.get("note") or (r.get("error") or "?").strip().splitlines()[-1]
            lines.append(head + f"| {r['status']}: {why} |" + " |" * 12)
            continue
        dloss = max((v for k, v in r.items() if k.startswith("dloss_vs_") and v is not None), default=None)
        lines.append(
            head + f"| {r['tokens_per_s']:.0f} | {fmt(r.get('vs_peft-padded'), '.2f')} "
            f"| {fmt(r.get('vs_peft-packed'), '.2f')} | {r['steady_s']:.2f} | {r['peak_rss_mb']:.0f} "
            f"| {fmt(r.get('estimate_mb'), '.0f')} | {fmt(r.get('cuda_max_allocated_mb'), '.0f')} "
            f"| {r['flops_per_s'] / 1e9:.2f} | {r['fraction_of_peak']:.1%} "
            f"| {fmt(r.get('pad_fraction'), '.1%')} "
            f"| {fmt(r.get('grouped_share'), '.0%')} | {r['mean_final_loss']:.4f} | {fmt(dloss, '.1e')} |"
        )
    lines += ["", "## Notes", "", *[f"- {note}" for note in report["notes"]], ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["config"], r["seq"], r["dtype"]) for r in report["rows"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (config, seq, dtype) in zip(axes[0], panels, strict=True):
        mine = [r for r in report["rows"] if (r["config"], r["seq"], r["dtype"]) == (config, seq, dtype)]
        for method, label in (
            ("pack", "lorafleet pack"),
            ("peft-padded", "sequential PEFT, padded"),
            ("peft-packed", "sequential PEFT, packed"),
            ("procs", "K processes"),
        ):
            points = sorted(
                (r["k"], r["tokens_per_s"])
                for r in mine
                if r["method"] == method
                and r["status"] == "ok"
                and r.get("kernel") in ("auto", None)
                and r.get("packing") is not False
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set(title=f"{config} · seq {seq} · {dtype}", xlabel="K adapters", ylabel="non-pad tokens/s")
        ax.set_xscale("log", base=2)
        ks = sorted({r["k"] for r in mine})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Multi-LoRA training throughput ({report['machine']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def notes() -> list[str]:
    return [
        "tokens/s = non-pad tokens of the steps after warm-up / their wall time; model load excluded.",
        "Useful FLOPs per document of n tokens = n·(4·N_lin + 6·Σ_lora r·(d_in+d_out)) + 12·L·d_attn·n²"
        " (frozen base: forward + activation gradients; LoRA: forward + both gradients; attention within"
        " the document only); % peak = achieved / measured matmul peak of the row's dtype.",
        "peft-padded = one base loaded once; per adapter get_peft_model → plain loop (AdamW, clip 1.0, same"
        " cosine LR, mean CE on full logits) → unload(); each batch padded to its own longest document."
        " peft-packed = the same with each batch flattened into one row (DataCollatorWithFlattening:"
        " restarting position ids, no mask). Same batches (the engine's SampleStream) and initial A as"
        " lorafleet, so final losses agree (Δloss = largest gap to either baseline).",
        "procs = K spawned processes, each a 1-adapter run_pack with cores//K threads; children wait on a"
        " barrier after warm-up; RSS is the sum of the children's peaks. Skipped when K × pack-of-1 RSS"
        f" > {RAM_FRACTION:.0%} of RAM.",
        "kernel rows: pack at the largest K with the loop and grouped LoRA kernels forced, and unpacked"
        " (padded rows, the pre-packing engine). grouped % = share of LoRA layer calls on the grouped"
        " kernel.",
        "pad % = padded positions forwarded / all positions (pack: as the engine laid them out).",
        "est. MB = the scheduler's memory estimate for the pack (orchestrator.scheduling.scheduler: "
        "base + K adapters"
        " at batch × seq tokens each, or on CPU one pass of ≤ 1,024 tokens + each adapter's excess over it;"
        " with checkpointing where the row used it), beside the measured"
        " peak RSS. +ckpt = the pack recomputed its decoder layers in backward (activation"
        " checkpointing: forced by --checkpointing on, or turned on by the memory model). (1 pass) = the"
        " whole pack step in one forward/backward; by default a CPU pack runs passes of ≤ 1,024 tokens of"
        " whole adapters (workers.contract.memory.CPU_PASS_TOKENS).",
    ]


def write_outputs(report: dict[str, Any], out_dir: Path, tag: str) -> Path:
    """multilora-<tag>.{json,md,png}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"multilora-{tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md, .png")
    return stem


def render(json_path: Path) -> dict[str, Any]:
    """Re-write the markdown table and the plot of an earlier run from its JSON (nothing re-measured)."""
    report = json.loads(json_path.read_text())
    json_path.with_suffix(".md").write_text(markdown(report))
    plot(report, json_path.with_suffix(".png"))
    print(f"rendered {json_path.with_suffix('.md')}, {json_path.with_suffix('.png')}")
    return report

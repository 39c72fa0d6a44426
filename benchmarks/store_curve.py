"""Quality against bytes: how much of the online forward-KL student's gain over CE only an offline store keeps, and
at what size on disk, for every target kind and encoding of the logit store (docs/store.md, the README).

    python benchmarks/store_curve.py                 # full size: the headline's teacher, student, steps; 3 seeds
    python benchmarks/store_curve.py --seeds 1 --student-steps 3 --teacher-steps 4 --max-documents 24 \
        --teacher-width 64 --student-width 32 --ks 8 --draws 4 \
        data.seq_len=64 train.micro_batch_size=4 train.eval_batches=2     # reduced: the slow test

The runs are the headline's (benchmarks/headline.py: configs/demo_teacher.yaml trained once, configs/demo.yaml's
student per seed, one `distill eval` of every student on the same validation tokens), with these recipes: CE only,
online forward KL, and one offline student per store: top-k at each k of --ks in the plain and the packed
encoding, and sampled targets at each N of --draws (packed: a plain sampled store decodes to the same targets, so
its students would be identical; its bytes are not measured). Every store is precomputed per seed from the rows that
seed's student reads (`demo.precompute_store`), and its bytes per token are the manifest's (every shard byte over
every stored token: ids, labels and targets together).

Per store and seed, the share of the gain = (val loss of the store's student - CE only's) / (online forward KL's -
CE only's), paired by seed; the table gives its mean and spread over seeds beside the mean bytes per token. Writes
store_curve.json, store_curve.md and store_curve.png (share of the gain against bytes per token, one line per kind)
into --output-dir; the headline's own files (headline.json, eval.json) stay there too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import headline  # noqa: E402  (the headline's runner, recipes and sizes)

from distributed_distill.demo import offline_overrides, precompute_store  # noqa: E402

ONLINE = headline.KD  # "forward KL": the online student whose gain the stores are measured against


def store_recipe(settings: list[str]) -> headline.Recipe:
    """An offline forward-KL student from a store precomputed with `settings`, in store order."""

    def prepare(student_cfg: str, teacher: str, work: Path, overrides: list[str]) -> None:
        precompute_store(student_cfg, teacher, work / "store", overrides, settings)

    return headline.Recipe(offline_overrides(Path("{work}") / "store"), prepare=prepare)


def recipes(ks: list[int], draws: list[int]) -> dict[str, tuple[str, str, int, headline.Recipe]]:
    """name -> (kind, encoding, k or N, recipe) of every store on the curve."""
    out = {}
    for encoding in ("plain", "packed"):
        for k in ks:
            settings = [f"distill.store_top_k={k}", f"distill.store_encoding={encoding}"]
            out[f"top-{k}, {encoding}"] = ("top-k", encoding, k, store_recipe(settings))
    for n in draws:
        settings = [f"distill.store_samples={n}", "distill.store_encoding=packed"]
        out[f"sampled {n}, packed"] = ("sampled", "packed", n, store_recipe(settings))
    return out


def curve(out: Path, sizes: headline.Sizes, stores: dict) -> list[dict]:
    """Train and evaluate every student (headline.run), then the share of the gain and the bytes of every store."""
    headline.RECIPES.update({name: entry[3] for name, entry in stores.items()})
    names = [headline.BASELINE, ONLINE, *stores]
    headline.run(out, sizes, names)
    rows = json.loads((out / "headline.json").read_text())["rows"]
    loss = {(r["recipe"], r["seed"]): r["val_loss"] for r in rows}
    table = []
    for name, (kind, encoding, size, _) in stores.items():
        shares, sizes_b = [], []
        for seed in range(sizes.seeds):
            gain = loss[ONLINE, seed] - loss[headline.BASELINE, seed]
            shares.append((loss[name, seed] - loss[headline.BASELINE, seed]) / gain)
            manifest = out / "students" / headline._slug(name) / f"seed{seed}" / "store" / "manifest.json"
            sizes_b.append(json.loads(manifest.read_text())["bytes_per_token"])
        table.append(
            {
                "store": name,
                "kind": kind,
                "encoding": encoding,
                "size": size,
                "bytes_per_token": statistics.fmean(sizes_b),
                "share": statistics.fmean(shares),
                "share_std": statistics.stdev(shares) if len(shares) > 1 else 0.0,
                "shares": shares,
            }
        )
    gains = [loss[ONLINE, s] - loss[headline.BASELINE, s] for s in range(sizes.seeds)]
    record = {"sizes": sizes.__dict__, "online_gain": gains, "stores": table}
    (out / "store_curve.json").write_text(json.dumps(record, indent=2) + "\n")
    md = markdown(table, gains)
    (out / "store_curve.md").write_text(md + "\n")
    plot(table, out / "store_curve.png")
    print(f"\n{md}\n\nwrote {out}/store_curve.*")
    return table


def markdown(table: list[dict], gains: list[float]) -> str:
    gain = statistics.fmean(gains)
    lines = [
        f"online forward KL's gain over CE only: {gain:+.4f} nats (mean of {len(gains)} seed(s): "
        + ", ".join(f"{g:+.4f}" for g in gains)
        + ")",
        "",
        "| store | bytes/token | share of online forward KL's gain (mean ± std over seeds) | per seed |",
        "|---|---:|---:|---|",
    ]
    for r in table:
        per_seed = ", ".join(f"{s:.1%}" for s in r["shares"])
        lines.append(
            f"| {r['store']} | {r['bytes_per_token']:.1f} | {r['share']:.1%} ± {r['share_std']:.1%} | {per_seed} |"
        )
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for (kind, encoding), style in {
        ("top-k", "plain"): "o-",
        ("top-k", "packed"): "s-",
        ("sampled", "packed"): "^-",
    }.items():
        mine = sorted((r for r in table if (r["kind"], r["encoding"]) == (kind, encoding)), key=lambda r: r["size"])
        if not mine:
            continue
        x, y = [r["bytes_per_token"] for r in mine], [100 * r["share"] for r in mine]
        ax.errorbar(x, y, yerr=[100 * r["share_std"] for r in mine], fmt=style, capsize=3, label=f"{kind}, {encoding}")
        for r in mine:
            ax.annotate(
                str(r["size"]),
                (r["bytes_per_token"], 100 * r["share"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axhline(100, color="gray", linestyle="--", linewidth=0.8)
    ax.axhline(95, color="gray", linestyle=":", linewidth=0.8)
    ax.axvline(40, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("store bytes per token (log scale)")
    ax.set_ylabel("% of online forward KL's gain over CE only")
    ax.set_title("offline students: quality against store size (labels: k or draws N)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/store_curve")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ks", type=int, nargs="*", default=[8, 16, 32, 64, 128], help="top-k stores")
    p.add_argument("--draws", type=int, nargs="*", default=[4, 8, 16, 32, 64], help="sampled stores (draws N)")
    p.add_argument("--teacher-steps", type=int)
    p.add_argument("--student-steps", type=int)
    p.add_argument("--max-documents", type=int)
    p.add_argument("--teacher-width", type=int)
    p.add_argument("--student-width", type=int)
    p.add_argument("--jobs", type=int, default=1, help="student runs at once (each one thread when > 1)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every run")
    a = p.parse_args(argv)
    if a.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every `distill` process
    sizes = headline.Sizes(
        seeds=a.seeds,
        teacher_steps=a.teacher_steps,
        student_steps=a.student_steps,
        max_documents=a.max_documents,
        teacher_width=a.teacher_width,
        student_width=a.student_width,
        eval_prompts=0,  # the validation loss is the curve's figure; no generation metrics
        overrides=a.overrides,
        jobs=a.jobs,
    )
    curve(Path(a.output_dir), sizes, recipes(a.ks, a.draws))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the chosen model attends: the picture of its trained attention in the report.

After a search (and its confirmation), the chosen configuration is trained once more, exactly as
its trial was, and the attention probabilities of its first layer on one held-out example are
drawn, one panel per head (``attention.png``; ``attention.json`` says which trial and example). A
person sees which keys each query reads, and where inside the pattern the model looks. The report
shows the picture only while it is of the configuration ``best_config.yaml`` holds (a later
``report --select`` that picks another drops it until it is drawn again).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from attn_search.engine.single import attention_probs
from attn_search.engine.tasks import IGNORE, make_task
from attn_search.engine.trainer import train_model
from attn_search.report.outputs import RunOutputs, load_run, row_config, select_row

PICTURE = "attention.png"
SIDECAR = "attention.json"
MAX_HEADS_SHOWN = 8


def draw_attention(run_dir: str | Path, *, device: str = "auto", say: Callable[[str], None] = print) -> Path | None:
    """Train the run's chosen configuration once more and draw its first layer's attention on the
    first held-out example; rewrites the report. ``None`` where nothing was chosen."""
    run_dir = Path(run_dir)
    study, space, record = load_run(run_dir)
    outputs = RunOutputs.from_record(run_dir, record, space)
    row = select_row(outputs.frame(study), space, outputs.select)
    if row is None:
        return None
    config = row_config(row)
    say(f"drawing what the chosen configuration attends: trial {int(row['trial'])} ({config.describe()}) "
        "trained once more")  # fmt: skip
    t0 = time.perf_counter()
    task = make_task(outputs.task_name, **outputs.task_kwargs)
    model, result = train_model(config, task, budget=record.budget_for(), device=device)
    x, y = task.data("eval", 1)
    probs = attention_probs(model, x[0].to(next(model.parameters()).device)).cpu()
    path = run_dir / PICTURE
    write_attention_picture(path, probs, title=f"trial {int(row['trial'])}: {config.describe()}, first layer, "
                            f"held-out example 0 (accuracy {result.metrics.get('accuracy', float('nan')):.3f} "
                            "when trained again)", scored=(y[0] != IGNORE))  # fmt: skip
    (run_dir / SIDECAR).write_text(json.dumps({"trial": int(row["trial"]), "config": config.to_dict(),
                                               "example": 0, "seconds": round(time.perf_counter() - t0, 1)}))  # fmt: skip
    outputs.write_all(study)
    return path


def write_attention_picture(path: Path, probs: torch.Tensor, *, title: str, scored: torch.Tensor) -> None:
    """One panel per head (up to :data:`MAX_HEADS_SHOWN`): the attention probabilities ``(L, L)``,
    query rows against key columns, on a log colour scale; the rows the task scores are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    heads = min(probs.shape[0], MAX_HEADS_SHOWN)
    cols = min(heads, 4)
    rows = (heads + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows + 0.6), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        image = ax.imshow(probs[h].clamp(min=1e-4).numpy(), cmap="viridis", norm=LogNorm(1e-4, 1.0),
                          interpolation="nearest")  # fmt: skip
        marked = scored.nonzero().flatten().numpy()
        ax.scatter([-1.5] * len(marked), marked, marker="_", s=12, color="crimson", clip_on=False)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query (red: scored)")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention probability")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)

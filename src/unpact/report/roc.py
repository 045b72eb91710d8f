"""The report's membership-inference figure: per method, the ROC curve of telling its
forget texts from never-taught holdout texts by the PrivLeak attack's score, with the
retrained reference's curve on the same texts drawn beside it (SPEC 9). The texts are the
items' answers and, dotted, the documents, each where it has holdout texts (MUSE's files:
documents only)."""

from __future__ import annotations

import io
import re
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from unpact.membership import auc, roc_points

if TYPE_CHECKING:
    from unpact.metrics import ItemRecord


def _scores(records: list[ItemRecord], split: str, attack: str, retrained: bool) -> list[float]:
    out = []
    for r in records:
        found = r.membership_retrained if retrained else r.membership
        if r.split == split and found is not None and attack in found:
            out.append(found[attack])
    return out


def roc_svg(records: list[ItemRecord], attack: str) -> str | None:
    """One small ROC panel per method as an inline SVG, or None without membership scores
    of holdout texts to draw them against."""
    return svg_of(lambda: roc_figure(records, attack))


# Text stays text (smaller, searchable), element ids are the same on every run, and a
# label is drawn as written: matplotlib reads "$...$" as mathematics, so a method named
# "a$^$b" (or a model path holding two dollars) was a ValueError traceback from its parser.
_SVG_SETTINGS: Any = {
    "svg.fonttype": "none",
    "svg.hashsalt": "unpact",
    "text.parse_math": False,
}


def svg_of(build: Callable[[], Any]) -> str | None:
    """The figure `build()` makes (None: no figure) as an inline SVG, without its date;
    matplotlib's settings are the caller's again afterwards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(_SVG_SETTINGS):
        fig = build()
        if fig is None:
            return None
        buf = io.StringIO()
        try:
            fig.savefig(buf, format="svg")
        finally:
            plt.close(fig)
    svg = re.sub(r"<metadata>.*?</metadata>", "", buf.getvalue(), flags=re.S)
    return svg[svg.index("<svg") :]


def roc_figure(records: list[ItemRecord], attack: str) -> Any:
    """`roc_svg`'s matplotlib figure (the caller closes it), or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in records if r.membership is not None))
    # the items' answers, and the documents where they were scored (dotted)
    sets = [
        (of, name)
        for of, name in (("", "answers"), ("_document", "documents"))
        if any(r.split == f"holdout{of}" and r.membership is not None for r in records)
    ]
    if not methods or not sets:  # no holdout texts: no curve to draw, only empty axes
        return None
    cols = min(4, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 4.0 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, method in zip(axes.flat, methods):
        mine = [r for r in records if r.method == method]
        for of, name in sets:
            tag = "" if len(sets) == 1 else f", {name}"
            for retrained, style, label in (
                (False, "-" if not of else ":", method),
                (True, "--" if not of else "-.", "retrained"),
            ):
                members = _scores(mine, f"forget{of}", attack, retrained)
                others = _scores(mine, f"holdout{of}", attack, retrained)
                fpr, tpr = roc_points(members, others)
                if fpr:
                    auc_text = f"AUC {auc(members, others):.2f}"
                    ax.plot(fpr, tpr, style, label=f"{label}{tag} ({auc_text})")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        ax.set_title(method, fontsize="medium")
        ax.set_xlabel("false positive rate", fontsize="small")
        ax.set_ylabel("true positive rate", fontsize="small")
        if ax.get_legend_handles_labels()[0]:  # below the panel: on it, it hid the curves
            ax.legend(
                fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False
            )
    texts = " and ".join(name for _, name in sets) or "texts"
    title = f"Membership inference ({attack}): forget {texts} (members) against holdout"
    # wrapped to the figure's width: one panel is narrower than the line, which ran off
    # both edges
    fig.suptitle(textwrap.fill(title, width=int(13 * 3.2 * cols)), fontsize="medium")
    return fig

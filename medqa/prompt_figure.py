"""The picture of the prompt layout (images/alpaca-style.png): what the model reads, what it learns to
write."""

from medqa.prompts import PREAMBLE


def draw_alpaca_figure(instruction: str = "What are the symptoms of Glaucoma ?",
                       output: str = "Open-angle glaucoma often has no early symptoms ..."):
    """A picture of the prompt layout: the parts the model reads, and the part it learns to write."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    parts = [
        ("Preamble", PREAMBLE.replace(". ", ".\n"), "#e8e8e8"),
        ("### Instruction:", instruction, "#cfe3ff"),
        ("### Input:", "(empty for MedQuAD: the question says it all)", "#f3f3f3"),
        ("### Response:", output, "#d6f5d6"),
    ]
    fig, ax = plt.subplots(figsize=(8, 4.6))
    ax.set_axis_off()
    y = 1.0
    for title, body, colour in parts:
        h = 0.2 if "\n" in body else 0.16
        y -= h + 0.04
        ax.add_patch(FancyBboxPatch((0.02, y), 0.96, h, boxstyle="round,pad=0.01", fc=colour, ec="#888888"))
        ax.text(0.04, y + h - 0.035, title, fontsize=11, fontweight="bold", va="top", family="monospace")
        ax.text(0.04, y + h - 0.09, body, fontsize=9.5, va="top", family="monospace")
    ax.text(0.5, 0.0, "prompt = preamble + instruction (+ input) + '### Response:'      target = the answer",
            ha="center", fontsize=9, style="italic")
    ax.set_title("Alpaca-style prompt for a MedQuAD question", fontsize=12)
    fig.tight_layout()
    return fig


if __name__ == "__main__":  # python -m medqa.prompt_figure images/alpaca-style.png
    import sys

    draw_alpaca_figure().savefig(sys.argv[1] if len(sys.argv) > 1 else "images/alpaca-style.png", dpi=120)

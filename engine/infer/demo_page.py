"""The demo page itself: a streamlit script that ``loraflow demo`` runs (``streamlit run``).

Streamlit runs this file top to bottom on every interaction; the model is loaded once
per server (``st.cache_resource``) by :class:`engine.infer.demo.SideBySide`, which holds
all the rendering. The form sends its fields only when "Generate" is pressed, so typing
a prompt does not start a render. Images are shown larger than they are drawn (a tiny
model draws 64 px) and carry ``alt`` texts ("base model image", "LoRA image") that
people with screen readers, and the browser test, find them by.
"""

from __future__ import annotations

import argparse
import sys

import streamlit as st

from engine.errors import LoraflowError
from engine.infer.demo import SideBySide

SHOWN_WIDTH = 384  # pixels on the page


def page_arguments(argv: list[str]) -> argparse.Namespace:
    """What ``loraflow demo`` passes after ``--`` (:func:`~engine.infer.demo.streamlit_command`)."""
    parser = argparse.ArgumentParser(prog="demo_page")
    parser.add_argument("--model", required=True)
    parser.add_argument("--lora", required=True)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--revision", default="main")
    parser.add_argument("--variant")
    parser.add_argument("--device")
    return parser.parse_args(argv)


@st.cache_resource(show_spinner="loading the model and the LoRA...")
def side_by_side(model: str, lora: str, revision: str, variant: str | None,
                 device: str | None) -> SideBySide:
    return SideBySide(model, lora, revision=revision, variant=variant, device=device)


def main() -> None:
    args = page_arguments(sys.argv[1:])
    st.set_page_config(page_title="loraflow demo", layout="wide")
    st.title("loraflow: base model vs LoRA")
    st.caption(f"model `{args.model}` · LoRA `{args.lora}`")
    try:
        renderer = side_by_side(args.model, args.lora, args.revision, args.variant, args.device)
    except LoraflowError as exc:
        st.error(f"cannot load: {exc}")
        return
    with st.form("generate"):
        prompt = st.text_input("Prompt", value="a red circle")
        negative_prompt = st.text_input("Negative prompt", value="")
        seed_col, steps_col, scale_col = st.columns(3)
        seed = seed_col.number_input("Seed", min_value=0, value=0, step=1)
        steps = steps_col.number_input("Steps", min_value=1, max_value=150,
                                       value=args.steps, step=1)
        scale = scale_col.slider("LoRA scale", min_value=0.0, max_value=2.0, value=1.0,
                                 step=0.05)
        submitted = st.form_submit_button("Generate", type="primary")
    if not submitted:
        st.info("Write a prompt and press Generate: the base model and the LoRA draw it "
                "from the same seed.")
        return
    with st.spinner("rendering the base model and the LoRA..."):
        pair = renderer.render(prompt, negative_prompt=negative_prompt, seed=int(seed),
                               steps=int(steps), lora_scale=float(scale))
    base_col, lora_col = st.columns(2)
    for col, image, title, alt in (
        (base_col, pair.base, "base model", "base model image"),
        (lora_col, pair.lora, f"LoRA at scale {scale:g}", "LoRA image"),
    ):
        col.subheader(title)
        col.image(image, width=SHOWN_WIDTH, alt=alt)
        col.code(image.info.get("parameters", ""), language=None, wrap_lines=True)


if __name__ == "__main__":
    main()

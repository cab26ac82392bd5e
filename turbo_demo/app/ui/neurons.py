"""The Neurons tab (each neuron's firing frequency over the run, and the activation
distributions) and the About tab: their components, and the NeuronsView's fields on them."""

from dataclasses import dataclass

import gradio as gr

from turbo_demo.app.ui.texts import ABOUT, NEURONS
from turbo_demo.app.views import compare as views


@dataclass(frozen=True)
class NeuronsTab:
    firing_left: gr.Plot
    firing_right: gr.Plot
    hist: gr.Plot


def neurons_tab() -> NeuronsTab:
    with gr.Tab("Neurons"):
        gr.Markdown(NEURONS)
        with gr.Row():
            firing_left = gr.Plot(label="Left: firing frequency")
            firing_right = gr.Plot(label="Right: firing frequency")
        hist = gr.Plot(label="Activation distributions")
    return NeuronsTab(firing_left, firing_right, hist)


def show_neurons(tab: NeuronsTab, view: views.NeuronsView) -> dict:
    """The view's figures on the tab (a figure the view has none of is left as it is)."""
    shown = {tab.firing_left: view.left_firing, tab.firing_right: view.right_firing, tab.hist: view.hist}
    return {component: figure for component, figure in shown.items() if figure is not None}


def about_tab() -> None:
    """What dReLU, the predictors and the backend do; our models' eval and bench numbers."""
    with gr.Tab("About"):
        gr.Markdown(ABOUT)
        gr.Markdown("#### Our embedded models (`python -m turbo_demo eval DIR --json`)\n" + views.about_numbers())
        gr.Markdown("#### Our decoding speed (`python -m turbo_demo bench --json`)\n" + views.bench_numbers())
        gr.Plot(value=views.training_curve(), label="Training curve")

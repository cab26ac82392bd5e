"""The page's one API endpoint, `compare` (a page module: gradio fills in its request). It is
also the MCP tool of `app.py --mcp`; its docstring (texts.COMPARE_DOC) lists the allowed values."""

from collections.abc import Callable
from threading import Event

import gradio as gr

from turbo_demo.app.engine.catalog import DEFAULT_LEFT, DEFAULT_RIGHT, ModelStore
from turbo_demo.app.engine.compare import Settings, SideRecord, compare_summary, run_compare
from turbo_demo.app.engine.public import Policy, RunQueue, client_of
from turbo_demo.app.ui.menus import AS_STORED, quant_of
from turbo_demo.app.ui.texts import COMPARE_DOC
from turbo_demo.choices import MODE_HELP
from turbo_demo.errors import UserError
from turbo_demo.runtime import Kernels


def compare_endpoint(
    store: ModelStore, kernels: Kernels, policy: Policy, queue: RunQueue, names: list[str]
) -> Callable[..., dict]:
    """The endpoint's function: one run through the page's RunQueue, as the Generate button's."""

    def compare(
        prompt: str,
        left_model: str = DEFAULT_LEFT[0],
        left_mode: str = DEFAULT_LEFT[1],
        right_model: str = DEFAULT_RIGHT[0],
        right_mode: str = DEFAULT_RIGHT[1],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        left_quant: str = AS_STORED,
        right_quant: str = AS_STORED,
        request: gr.Request = None,  # type: ignore[assignment]  # Gradio fills it in
    ) -> dict:
        left = SideRecord(left_model, left_mode, quant=quant_of(left_quant))
        right = SideRecord(right_model, right_mode, quant=quant_of(right_quant))
        settings, stop = Settings(max_new_tokens, temperature, 1.0, seed), Event()
        try:
            ticket = queue.join(client_of(request))
        except UserError as exc:
            return {"error": str(exc)}
        try:
            for _ in queue.wait(ticket, stop):
                pass
            for _ in run_compare(store, left, right, prompt, settings, stop, kernels, policy=policy):
                pass
        except UserError as exc:
            return {"error": str(exc)}
        finally:
            queue.leave(ticket)
        return compare_summary(left, right)

    compare.__doc__ = COMPARE_DOC.format(models=", ".join(names), modes=", ".join(MODE_HELP))
    return compare

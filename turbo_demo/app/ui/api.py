"""The page's one API endpoint, `compare` (a page module: gradio fills in its request). It is
also the MCP tool of `app.py --mcp`; its docstring (texts.COMPARE_DOC) lists the allowed values."""

from collections.abc import Callable
from dataclasses import dataclass
from threading import Event

import gradio as gr

from turbo_demo.app.engine.catalog import DEFAULT_LEFT, DEFAULT_RIGHT, ModelStore
from turbo_demo.app.engine.compare import Settings, last_round, run_compare
from turbo_demo.app.engine.public import Policy, RunQueue, client_of
from turbo_demo.app.engine.sides import SideRequest, compare_summary
from turbo_demo.app.ui.menus import AS_STORED, quant_of
from turbo_demo.app.ui.texts import COMPARE_DOC
from turbo_demo.choices import MODE_HELP
from turbo_demo.errors import UserError
from turbo_demo.runtime import Kernels


@dataclass(frozen=True)
class CompareCall:
    """What one call of the endpoint asks: the prompt, each side, and the settings."""

    prompt: str
    left: SideRequest
    right: SideRequest
    settings: Settings


def compare_endpoint(
    store: ModelStore, kernels: Kernels, policy: Policy, queue: RunQueue, names: list[str]
) -> Callable[..., dict]:
    """The endpoint's function: one run through the page's RunQueue, as the Generate button's."""

    def answer(call: CompareCall, client: str) -> dict:
        """The call's JSON summary, or {"error": ...} where the queue or the policy refuses it."""
        stop = Event()
        try:
            ticket = queue.join(client)
        except UserError as exc:
            return {"error": str(exc)}
        try:
            for _ in queue.wait(ticket, stop):
                pass
            rounds = run_compare(store, call.left, call.right, call.prompt, call.settings, stop, kernels, policy=policy)
            return compare_summary(*last_round(rounds))
        except UserError as exc:
            return {"error": str(exc)}
        finally:
            queue.leave(ticket)

    # Its parameters are the public API: Gradio's clients pass them by position or by name, the
    # MCP tool's schema names them, and Gradio hands the request only to a parameter annotated
    # gr.Request. So it takes them one by one and makes the CompareCall that `answer` runs.
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
        left = SideRequest(left_model, left_mode, quant_of(left_quant))
        right = SideRequest(right_model, right_mode, quant_of(right_quant))
        settings = Settings(max_new_tokens, temperature, 1.0, seed)
        return answer(CompareCall(prompt, left, right, settings), client_of(request))

    compare.__doc__ = COMPARE_DOC.format(models=", ".join(names), modes=", ".join(MODE_HELP))
    return compare

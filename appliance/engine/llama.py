"""llama.cpp inference (the only module that imports llama_cpp).

`LlamaEngine` loads a GGUF after checking its header in Python (the full structure was checked at
install, see `modelfile`), renders prompts with the chat
template shipped in the generation (never the one inside the GGUF), and streams text pieces.
Consecutive prompts that share a prefix (the system prompt) reuse llama.cpp's KV cache.

Only the template may write control tokens: a prompt is rendered with a placeholder for each
message's content, the template's own text is tokenized with special tokens recognised, and each
content (questions, history, document text) is tokenized as plain text, so a document's `</s>` or
`<|user|>` stays those characters and never becomes the end-of-sequence or a role token.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.bundles.modelfile import check_header
from appliance.errors import ModelError
from appliance.protocols import Sampling

MAX_RENDER_CHARS = 2_000_000  # a prompt fills at most n_ctx tokens; this is far past any real one
MAX_RENDER_S = 2.0
MAX_LOOP_STEPS = 200_000  # range() iterations in one render, all loops together


class RenderBudget(ModelError):
    """A chat template ran past its time, output or loop budget (a hostile or broken template)."""


class _Budget:
    def __init__(self):
        self.deadline = time.monotonic() + MAX_RENDER_S
        self.steps = 0

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_LOOP_STEPS:
            raise RenderBudget(f"chat template looped more than {MAX_LOOP_STEPS} times", "rebuild the bundle")
        if time.monotonic() > self.deadline:
            raise RenderBudget(
                f"chat template took longer than {MAX_RENDER_S} s to render", "rebuild the bundle"
            )

    def size(self, value) -> None:
        if isinstance(value, (str, bytes, list, tuple)) and len(value) > MAX_RENDER_CHARS:
            raise RenderBudget(f"chat template built a value of {len(value)} items", "rebuild the bundle")


_budget = threading.local()
_WIDE_FORMAT_RE = re.compile(r"%[-+ 0#]*(\*|\d{7,})|\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")


def _too_big(values) -> bool:
    return any(
        (isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_RENDER_CHARS)
        or (isinstance(v, str) and _WIDE_FORMAT_RE.search(v))
        for v in values
    )


class _RenderTimeout(BaseException):
    """Raised inside a render that ran past MAX_RENDER_S (by the watchdog)."""


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every range() counted, `*`, `+`, `%` and `**` results bounded and
    size arguments of the padding filters capped: a template cannot hang the health check or build a
    2 GB string on some prompt it was not tested with."""

    intercepted_binops = frozenset(["*", "+", "%", "**"])

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.globals["range"] = self._range
        for name in ("center", "indent", "wordwrap", "truncate", "format", "join", "replace"):
            self.filters[name] = self._bounded_filter(self.filters[name])

    @staticmethod
    def _current() -> _Budget:
        budget = getattr(_budget, "now", None)
        if budget is None:
            budget = _budget.now = _Budget()
        return budget

    def _range(self, *args):
        numbers = range(*args)
        self._current().size(numbers)

        def counted():
            budget = self._current()
            for n in numbers:
                budget.step()
                yield n

        return counted()

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        """Every call the template makes: time checked, size arguments (`ljust(10**9)`, a format width)
        refused, the result's size bounded."""
        __self._current().step(0)
        bound = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # str.format: its string
        if _too_big((*args, *kwargs.values(), bound)):
            raise RenderBudget("chat template asked for a size past the render budget", "rebuild the bundle")
        result = super().call(__context, __obj, *args, **kwargs)
        __self._current().size(result)
        return result

    def _bounded_filter(self, original):
        def bounded(*args, **kwargs):
            if _too_big((*args, *kwargs.values())):
                raise RenderBudget(
                    "chat template asked a filter for a size past the render budget", "rebuild the bundle"
                )
            result = original(*args, **kwargs)
            self._current().size(result)
            return result

        for attr in ("jinja_pass_arg",):
            if hasattr(original, attr):
                setattr(bounded, attr, getattr(original, attr))
        return bounded

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise RenderBudget("chat template raised a number to a huge power", "rebuild the bundle")
        if operator in ("*", "+", "%"):
            for a, b in ((left, right), (right, left)):
                if (
                    isinstance(a, (str, list, tuple))
                    and isinstance(b, int)
                    and len(a) * abs(b) > MAX_RENDER_CHARS
                ):
                    raise RenderBudget(
                        "chat template built a string past the render budget", "rebuild the bundle"
                    )
            if operator == "%" and isinstance(left, str) and re.search(r"%[-+ 0#]*(\*|\d{7,})", left):
                raise RenderBudget("chat template formatted with a huge width", "rebuild the bundle")
        result = super().call_binop(context, operator, left, right)
        self._current().size(result)
        return result


def compile_template(text: str):
    env = _BudgetedEnvironment(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
    try:
        return env.from_string(text)
    except TemplateError as exc:
        raise ModelError(f"chat template does not compile ({exc})", "rebuild the generation") from exc
    except RecursionError as exc:
        raise ModelError("chat template is nested too deeply to compile", "rebuild the generation") from exc


def render_template(template, **values) -> str:
    """Render within the budget: output checked as it is produced, loops and time counted."""
    import ctypes

    _budget.now = budget = _Budget()
    parts: list[str] = []
    total = 0
    thread, guard, state = threading.get_ident(), threading.Lock(), {"done": False, "fired": False}

    def stop():  # a loop the counters cannot see (over a string, with no output) is stopped from outside
        with guard:
            if not state["done"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(thread), ctypes.py_object(_RenderTimeout)
                )

    watchdog = threading.Timer(MAX_RENDER_S + 0.5, stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        for part in template.generate(**values):
            total += len(part)
            if total > MAX_RENDER_CHARS:
                raise RenderBudget(
                    f"chat template produced more than {MAX_RENDER_CHARS} characters", "rebuild the bundle"
                )
            budget.step(0)
            parts.append(part)
    except TemplateError as exc:
        raise ModelError(f"chat template failed to render ({exc})", "rebuild the generation") from exc
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise RenderBudget(
            f"chat template failed to render ({type(exc).__name__})", "rebuild the bundle"
        ) from exc
    except _RenderTimeout as exc:
        raise RenderBudget(
            f"chat template took longer than {MAX_RENDER_S} s to render", "rebuild the bundle"
        ) from exc
    finally:
        watchdog.cancel()
        with guard:
            state["done"] = True
            if state["fired"]:  # fired after the render ended: withdraw it before it lands elsewhere
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), None)
        _budget.now = None
    return "".join(parts)


_MARK_RE = re.compile("\ue000(\\d+)\ue001")


class LlamaEngine:
    """A loaded model; use as a context manager so its memory is released."""

    def __init__(
        self,
        model_path: Path,
        template_text: str,
        n_ctx: int = 2048,
        threads: int = 0,
        name: str | None = None,
        seed: int = 0,
        mmap: bool = False,
        vocab_only: bool = False,
    ):
        """`mmap=False` (default): llama.cpp reads the weights into memory once. With mmap, CPUs whose
        quant types llama.cpp repacks (AVX2 Q4_K, Q4_0...) keep both the mapped file pages and the
        repacked copy resident: 1,408 MB against 976 MB for a 766 MB Q4_K_M model (bench/service.py).
        `vocab_only`: the tokenizer and template without the weights (the engine server generates)."""
        check_header(model_path)
        import llama_cpp

        self.template = compile_template(template_text)
        self.name = name or model_path.stem
        self.n_ctx = n_ctx
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(model_path),
                n_ctx=n_ctx,
                n_batch=min(512, n_ctx),
                n_threads=threads or (os.cpu_count() or 1),
                seed=seed,
                use_mmap=mmap,
                vocab_only=vocab_only,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(
                f"{model_path}: llama.cpp could not load the model ({exc})",
                "check free memory, then reinstall the generation",
            ) from exc
        self.prompt_tokens = 0
        self.bos_text = self._piece(self.llm.token_bos())
        self.eos_text = self._piece(self.llm.token_eos())

    def _piece(self, token: int) -> str:
        return (
            self.llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""
        )

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def render(self, messages: list[dict]) -> str:
        return render_template(
            self.template,
            messages=messages,
            bos_token=self.bos_text,
            eos_token=self.eos_text,
            add_generation_prompt=True,
        )

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """`special`: recognise control-token text (only for the template's own text)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special) if text else []

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """The rendered prompt's tokens, with control tokens only where the template wrote them."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        rendered = self.render([dict(m, content=mark) for m, mark in zip(messages, marks, strict=True)])
        tokens: list[int] = []
        at = 0
        for found in _MARK_RE.finditer(rendered):
            tokens += self.tokenize(rendered[at : found.start()], special=True)
            tokens += self.tokenize(messages[int(found.group(1))]["content"] or "")
            at = found.end()
        return tokens + self.tokenize(rendered[at:], special=True)

    def prompt_for(
        self, messages: list[dict], max_tokens: int, sampling: Sampling | None = None
    ) -> list[int]:
        """The prompt's tokens, refused when they and `max_tokens` do not fit the context (here, or in
        the engine server's slot this tokenizer stands for), or when `sampling` biases a token the
        vocabulary does not have."""
        if sampling is not None:
            n_vocab = self.llm.n_vocab()
            outside = [t for t, _ in sampling.logit_bias if not 0 <= t < n_vocab]
            if outside:
                raise ModelError(
                    f"logit_bias names token {outside[0]}, outside this model's vocabulary "
                    f"of {n_vocab} tokens",
                    f"use token ids 0 to {n_vocab - 1}",
                )
        tokens = self.encode_prompt(messages)
        self.prompt_tokens = len(tokens)  # the exact count, template included, for usage reports
        if len(tokens) + max_tokens > self.n_ctx:
            raise ModelError(
                f"prompt of {len(tokens)} tokens plus {max_tokens} to generate exceeds the "
                f"{self.n_ctx}-token context",
                "shorten the question or lower max tokens",
            )
        return tokens

    def stream(self, messages: list[dict], max_tokens: int, sampling: Sampling) -> Iterator[str]:
        tokens = self.prompt_for(messages, max_tokens, sampling)
        for part in self.llm.create_completion(
            tokens,
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
            logit_bias=dict(sampling.logit_bias) or None,
            seed=sampling.seed,
            stop=list(sampling.stop),
            stream=True,
        ):
            yield part["choices"][0]["text"]  # one piece per token; "" while a UTF-8 character is incomplete

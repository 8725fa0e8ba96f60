"""llama.cpp inference (the only module that imports llama_cpp).

`LlamaEngine` loads a GGUF after checking its header in Python (the full structure was checked at
install, see `modelfile`), renders prompts with the chat
template shipped in the generation (never the one inside the GGUF), and streams text pieces.
Consecutive prompts that share a prefix (the system prompt) reuse llama.cpp's KV cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.errors import ModelError
from appliance.modelfile import check_header


def compile_template(text: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)
    try:
        return env.from_string(text)
    except TemplateError as exc:
        raise ModelError(f"chat template does not compile ({exc})", "rebuild the generation") from exc


class LlamaEngine:
    """A loaded model; use as a context manager so its memory is released."""

    def __init__(self, model_path: Path, template_text: str, n_ctx: int = 2048, threads: int = 0,
                 name: str | None = None, seed: int = 0, mmap: bool = False):
        """`mmap=False` (default): llama.cpp reads the weights into memory once. With mmap, CPUs whose
        quant types llama.cpp repacks (AVX2 Q4_K, Q4_0...) keep both the mapped file pages and the
        repacked copy resident: 1,408 MB against 976 MB for a 766 MB Q4_K_M model (bench/service.py)."""
        check_header(model_path)
        import llama_cpp

        self.template = compile_template(template_text)
        self.name = name or model_path.stem
        self.n_ctx = n_ctx
        try:
            self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=min(512, n_ctx),
                                       n_threads=threads or (os.cpu_count() or 1), seed=seed, use_mmap=mmap,
                                       verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{model_path}: llama.cpp could not load the model ({exc})",
                             "check free memory, then reinstall the generation") from exc
        self.prompt_tokens = 0
        self.bos_text = self._piece(self.llm.token_bos())
        self.eos_text = self._piece(self.llm.token_eos())

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, bos_token=self.bos_text, eos_token=self.eos_text,
                                        add_generation_prompt=True)
        except TemplateError as exc:
            raise ModelError(f"chat template failed to render ({exc})", "rebuild the generation") from exc

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def stream(self, messages: list[dict], max_tokens: int, temperature: float) -> Iterator[str]:
        tokens = self.tokenize(self.render(messages))
        self.prompt_tokens = len(tokens)  # the exact count, template included, for usage reports
        if len(tokens) + max_tokens > self.n_ctx:
            raise ModelError(f"prompt of {len(tokens)} tokens plus {max_tokens} to generate exceeds the "
                             f"{self.n_ctx}-token context", "shorten the question or lower max tokens")
        for part in self.llm.create_completion(tokens, max_tokens=max_tokens, temperature=temperature,
                                               top_p=0.95, repeat_penalty=1.1, stream=True):
            yield part["choices"][0]["text"]  # one piece per token; "" while a UTF-8 character is incomplete

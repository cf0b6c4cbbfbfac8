"""How synthesis samples text: in this process (`synth.engine=hf`, batched generate) or from an
inference server (vllm, sglang, transformers serve, or an external address: eval=generate's
servers, evaluation/server.py), asked through the openai client.

Both answer a batch under one deadline, `synth.batch_timeout_s`, and return None when it struck,
so the pipeline's retry-at-half-size and its error are the same for every engine: in process the
deadline is transformers' `max_time`; from a server it is the HTTP timeout of each request and a
wait for the whole batch's requests, which are in flight together (`synth.concurrency` at a
time). Instructions are plain completions of the pre-query text (`/v1/completions`, stopped at
the end of the user turn), answers chat completions of one user turn. Each item of a batch gets
its own seed on a server (vLLM and SGLang honour per-request seeds), the batch one seed in process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from lmalign import models
from lmalign.evaluation import server
from lmalign.schema import HardwareConfig, ModelConfig, SynthConfig

log = logging.getLogger(__name__)
Sampled = list[tuple[str, str]]  # (text, finish reason: stop | length) per prompt
SERVER_DIR = "server"  # under synth/: the generator server's log


class InProcess:
    """synth.engine=hf: the generator loaded here when first asked, dropped when the `sampler`
    block ends, before the reward model loads."""

    def __init__(self, start: models.Start, loading: ModelConfig, hardware: HardwareConfig,
                 tokenizer):
        self.start, self.loading, self.hardware, self.tokenizer = start, loading, hardware, tokenizer
        self.loaded = None

    def complete(self, prompts: list[str], temperature: float, top_p: float, max_new_tokens: int,
                 stop: str | None, seed: int, deadline_s: float) -> Sampled | None:
        if self.loaded is None:
            self.loaded = models.load_start(self.start, self.loading, self.hardware,
                                            continue_adapter=False, trains_weights=False).eval()
        return _generate(self.loaded, self.tokenizer, prompts, temperature, top_p, max_new_tokens,
                         stop, seed, deadline_s)

    def chat(self, instructions: list[str], temperature: float, top_p: float,
             max_new_tokens: int, seed: int, deadline_s: float) -> Sampled | None:
        rendered = [self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            for text in instructions]
        return self.complete(rendered, temperature, top_p, max_new_tokens, None, seed,
                             deadline_s)

    def release(self) -> None:
        self.loaded = None


class Served:
    """A server engine: started when first asked (a re-run with every shard made starts none),
    stopped when the `sampler` block ends, before the reward model loads."""

    def __init__(self, synth: SynthConfig, start: models.Start, loading: ModelConfig,
                 hardware: HardwareConfig, tokenizer, work: Path, stack: ExitStack):
        self.synth, self.start, self.hardware, self.tokenizer = synth, start, hardware, tokenizer
        self.loading, self.work, self.stack = loading, work / SERVER_DIR, stack
        self.client, self.name = None, ""

    def _connect(self) -> None:
        from lmalign.evaluation.cells import Target

        if self.client is not None:
            return
        synth = self.synth
        server.end_left_behind(self.work)  # a run killed outright could not stop its server
        target = Target("generator", None, self.start.adapter or self.start.path,
                        self.start.revision)
        served = server.served_model(target, synth.engine, self.loading, self.hardware,
                                     self.work, "synth.engine=hf samples with it unmerged")
        running = self.stack.enter_context(server.serving(
            served.launch, self.work / "server.log", float(synth.server_startup_timeout_s),
            synth.server_address))
        # The client's retries handle 429, 5xx and dropped connections; the deadline is the
        # batch's, whatever the retries do.
        self.client = server.client(running.base_url, synth.api_key_env, 2,
                                    synth.batch_timeout_s)
        self.name = served.name

    def complete(self, prompts: list[str], temperature: float, top_p: float, max_new_tokens: int,
                 stop: str | None, seed: int, deadline_s: float) -> Sampled | None:
        self._connect()
        bos = self.tokenizer.bos_token or ""

        def ask(index: int, prompt: str) -> tuple[str, str]:
            # A server adds the BOS token itself when it tokenizes a completion's prompt.
            text = prompt[len(bos):] if bos and prompt.startswith(bos) else prompt
            answer = self.client.completions.create(
                model=self.name, prompt=text, max_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, seed=seed + index, stop=[stop] if stop else None,
                extra_body=server.sampling_fields(self.synth.engine, temperature) or None)
            return _ended(answer.choices[0].text, answer.choices[0].finish_reason, stop,
                          self.tokenizer.eos_token)

        return self._together([lambda i=i, p=p: ask(i, p) for i, p in enumerate(prompts)],
                              deadline_s)

    def chat(self, instructions: list[str], temperature: float, top_p: float,
             max_new_tokens: int, seed: int, deadline_s: float) -> Sampled | None:
        self._connect()

        def ask(index: int, instruction: str) -> tuple[str, str]:
            answer = self.client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": instruction}],
                max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=seed + index,
                extra_body=server.sampling_fields(self.synth.engine, temperature) or None)
            return _ended(answer.choices[0].message.content or "",
                          answer.choices[0].finish_reason, None, self.tokenizer.eos_token)

        return self._together([lambda i=i, t=t: ask(i, t) for i, t in enumerate(instructions)],
                              deadline_s)

    def _together(self, calls: list[Callable[[], tuple[str, str]]],
                  deadline_s: float) -> Sampled | None:
        """Every request of the batch, or None when they were not all answered in time (the
        ones still waiting are abandoned; their HTTP timeout ends them)."""
        import openai

        pool = ThreadPoolExecutor(self.synth.concurrency)
        try:
            futures = [pool.submit(call) for call in calls]
            _, pending = wait(futures, timeout=deadline_s)
            if pending or any(isinstance(f.exception(), openai.APITimeoutError) for f in futures):
                return None
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _ended(text: str, finish_reason: str | None, stop: str | None,
           eos: str | None) -> tuple[str, str]:
    """A server's text without a stop string or EOS some servers leave in (transformers serve
    returns the stop string it stopped at; vLLM does not)."""
    for mark in (stop, eos):
        if mark and mark in text:
            return text[:text.index(mark)], "stop"
    return text, "length" if finish_reason == "length" else "stop"


@contextmanager
def sampler(synth: SynthConfig, start: models.Start, loading: ModelConfig,
            hardware: HardwareConfig, tokenizer, work: Path) -> Iterator[InProcess | Served]:
    """The engine synth.engine names; whatever it started ends with the block."""
    if synth.engine == "hf":
        engine = InProcess(start, loading, hardware, tokenizer)
        try:
            yield engine
        finally:
            engine.release()
        return
    with ExitStack() as stack:
        yield Served(synth, start, loading, hardware, tokenizer, work, stack)


def _generate(loaded, tokenizer, prompts: list[str], temperature: float, top_p: float,
              max_new_tokens: int, stop: str | None, seed: int, deadline_s: float
              ) -> Sampled | None:
    """One generate call for the batch, left-padded; None when `max_time` struck."""
    import torch

    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    encoded = encoded.to(next(loaded.parameters()).device)
    sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_p": top_p} \
        if temperature > 0 else {"do_sample": False}
    stops = {"stop_strings": [stop], "tokenizer": tokenizer} if stop else {}
    torch.manual_seed(seed)
    started = time.monotonic()
    with torch.inference_mode():
        out = loaded.generate(**encoded, max_new_tokens=max_new_tokens, max_time=deadline_s,
                              pad_token_id=tokenizer.pad_token_id, **sampling, **stops)
    if time.monotonic() - started >= deadline_s:
        return None
    found = []
    for row in out[:, encoded["input_ids"].shape[1]:].tolist():
        kept = [t for t in row if t != tokenizer.pad_token_id]
        text = tokenizer.decode(kept, skip_special_tokens=False)
        ends = [text.find(mark) for mark in (stop, tokenizer.eos_token) if mark and mark in text]
        if ends:
            found.append((tokenizer.decode(tokenizer(text[:min(ends)], add_special_tokens=False)
                                           ["input_ids"], skip_special_tokens=True), "stop"))
        else:
            finish = "length" if len(kept) >= max_new_tokens else "stop"
            found.append((tokenizer.decode(kept, skip_special_tokens=True), finish))
    return found

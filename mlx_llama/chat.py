"""Multi-turn chat that keeps its KV cache between turns.

Each turn renders the whole conversation with the chat template, as a model trained on it expects,
then reuses the longest prefix of those ids the cache already holds and runs only the rest through
the model. The tokens are exactly those of processing the whole history from scratch; the work per
turn is the new text only, so the time to the first token does not grow with the conversation.

``python -m mlx_llama.chat --model DIR`` is a line-by-line REPL over ``ChatSession``.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import mlx.core as mx

from .errors import MlxLlamaError
from .generate import GenerationResponse, stream_generate
from .prompt_cache import (
    PromptCacheError,
    PromptCacheMismatch,
    common_prefix,
    load_prompt_cache,
    model_fingerprint,
    save_prompt_cache,
    trim_cache,
)


@dataclass
class ChatResponse(GenerationResponse):
    """A ``GenerationResponse`` whose ``prompt_tokens`` counts only the tokens processed this turn."""

    reused_tokens: int = 0  # prompt tokens already in the KV cache, not processed again
    time_to_first_token: float = 0.0  # seconds from the start of the turn


class ChatSession:
    """A conversation (``messages``) plus the KV cache of its token ids.

    ``send`` adds a user message and streams the reply; ``reset`` starts the conversation again
    (keeping the cache, whose system-prompt prefix the next turn reuses); ``save`` / ``load`` write
    and read the cache and the messages as a prompt cache file."""

    def __init__(self, model, tokenizer, system_prompt: Optional[str] = None):
        if tokenizer.chat_template is None:
            raise MlxLlamaError("the tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.messages: List[dict] = []
        self._cache = model.make_cache()
        self._ids: List[int] = []  # exactly the token ids whose K/V the cache holds
        self._fingerprint = None
        self._busy = False  # a reply is being generated: the cache is the generator's until it ends
        self.reset()

    @property
    def cached_tokens(self) -> List[int]:
        """The token ids the KV cache holds, in order."""
        return list(self._ids)

    def reset(self) -> None:
        """Forget the conversation (back to the system prompt)."""
        self._check_idle()
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def encode(self, messages: List[dict]) -> List[int]:
        """Token ids of ``messages`` rendered with the chat template, ready for the assistant's reply."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # As Tokenizer.encode_chat: a template that writes the BOS text itself gets no second BOS.
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_bos=False if bos is not None and text.startswith(bos) else None)

    def send(
        self,
        user_text: str,
        *,
        max_tokens: int = 256,
        sampler: Optional[Callable] = None,
        prefill_step_size: int = 512,
    ) -> Iterator[ChatResponse]:
        """Add ``user_text`` to the conversation and yield the reply a token at a time.

        The conversation is updated as tokens arrive and the cache's bookkeeping when the reply
        ends, also when it is cut short (the iterator closed or dropped, Ctrl-C): the reply stays
        as far as it got. Exhaust or close the iterator before the next ``send``."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise MlxLlamaError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not isinstance(user_text, str) or not user_text.strip():
            raise MlxLlamaError("the message is empty")
        self._check_idle()
        return self._turn(user_text, max_tokens, sampler, prefill_step_size)

    def _check_idle(self) -> None:
        if self._busy:
            raise RuntimeError("a reply is still being generated: exhaust or close its iterator first")

    def _turn(self, user_text, max_tokens, sampler, prefill_step_size) -> Iterator[ChatResponse]:
        self._check_idle()
        tic = time.perf_counter()
        user = {"role": "user", "content": user_text}
        ids = self.encode(self.messages + [user])
        # Reuse what the cache holds of these ids; at least the last one is run again, for its logits.
        reused = min(common_prefix(self._ids, ids), len(ids) - 1)
        trim_cache(self._cache, reused)
        self._ids = self._ids[:reused]
        suffix = ids[reused:]

        reply = {"role": "assistant", "content": ""}
        self.messages += [user, reply]
        generated: List[int] = []
        ttft = None
        self._busy = True
        try:
            records = stream_generate(
                self.model,
                self.tokenizer,
                suffix,
                max_tokens=max_tokens,
                sampler=sampler,
                prefill_step_size=prefill_step_size,
                cache=self._cache,
            )
            for r in records:
                generated.append(r.token)
                if ttft is None:
                    ttft = time.perf_counter() - tic
                reply["content"] += r.text
                yield ChatResponse(**vars(r), reused_tokens=reused, time_to_first_token=ttft)
        finally:
            self._busy = False
            self._sync(ids + generated)
            if not generated:  # cut off before the reply began: the turn did not happen
                self.messages = self.messages[:-2]

    def _sync(self, known: List[int]) -> None:
        """Bring ``_ids`` in line with the cache after generating ``known``.

        generate_step runs one step ahead: once it yields token t it has already fed t to the model,
        so the cache holds every yielded token, except the last one of a reply cut by max_tokens. It
        may also hold less (a prefill interrupted between layers); cut all layers to what every layer
        holds and is known."""
        n = min(min(c.offset for c in self._cache), len(known))
        trim_cache(self._cache, n)
        self._ids = list(known[:n])

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def save(self, path) -> Path:
        """Write the KV cache, its token ids and the messages to ``path`` (a prompt cache file)."""
        return save_prompt_cache(path, self._cache, self._ids, self.fingerprint(), {"messages": self.messages})

    def load(self, path, restore_messages: bool = True) -> None:
        """Read a file written by ``save`` (or any prompt cache for this model). With
        ``restore_messages`` the saved conversation continues; without, only the cache is taken and
        the next turn reuses whatever prefix it shares with this conversation."""
        self._check_idle()
        cache, ids, meta = load_prompt_cache(path, self.model, return_metadata=True)
        messages = meta.get("messages", [])
        if restore_messages:
            ok = isinstance(messages, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
            if not ok:
                raise PromptCacheError(f"{path}: corrupt prompt cache (messages are not role/content pairs)")
            self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        self._cache, self._ids = cache, ids


def format_turn_stats(r: ChatResponse) -> str:
    return (
        f"[prompt: {r.prompt_tokens} tokens processed, {r.reused_tokens} reused; "
        f"first token {r.time_to_first_token:.3f} s; "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tokens/s]"
    )


# ---------------------------------------------------------------------------------------------
# command line

COMMANDS = "/reset, /save FILE, /load FILE, /quit"


def chat_args(argv=None):
    from .cli import _Parser, _positive_int, add_sampling_args

    p = _Parser(
        prog="python -m mlx_llama.chat",
        description=f"Chat with a converted MLX Llama model, one message per line. Commands: {COMMANDS}.",
    )
    p.add_argument("--model", required=True, help="MLX model directory (from convert.py) or Hub repo id")
    p.add_argument("--system-prompt", help="system message for the chat template")
    p.add_argument("--max-tokens", type=_positive_int, default=256, help="most tokens per reply (default: 256)")
    add_sampling_args(p)
    p.add_argument(
        "--prompt-cache-file",
        help="reuse the KV cache in this file where it matches (e.g. a long system prompt); save it there at exit",
    )
    return p.parse_args(argv)


def _chat(argv) -> int:
    a = chat_args(argv)
    from .loader import load
    from .sample import make_sampler

    if a.seed is not None:
        mx.random.seed(a.seed)
    model, tokenizer = load(a.model)
    if tokenizer.chat_template is None:
        raise MlxLlamaError(
            f"{a.model}: the tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)"
        )
    session = ChatSession(model, tokenizer, system_prompt=a.system_prompt)
    sampler = make_sampler(a.temp, a.top_p, a.top_k, a.min_p)
    if a.prompt_cache_file and Path(a.prompt_cache_file).exists():
        try:
            session.load(a.prompt_cache_file, restore_messages=False)
            print(f"[prompt cache {a.prompt_cache_file}: {len(session.cached_tokens)} tokens]", flush=True)
        except PromptCacheMismatch as e:
            warnings.warn(f"{e}; starting without it")

    interactive = sys.stdin.isatty()
    failed = False
    try:
        while True:
            if interactive:
                print(">> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:  # end of input
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                arg = arg.strip()
                if cmd == "/quit":
                    break
                try:
                    _command(session, cmd, arg)
                except MlxLlamaError as e:  # a bad file or command: say so and keep chatting
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    failed = True
                continue
            last = None
            for last in session.send(
                line, max_tokens=a.max_tokens, sampler=sampler, prefill_step_size=a.prefill_step_size
            ):
                print(last.text, end="", flush=True)
            print()
            print(format_turn_stats(last), flush=True)
    finally:
        # Also after Ctrl-C: the session is consistent at any point of a turn.
        if a.prompt_cache_file:
            session.save(a.prompt_cache_file)
    return 1 if failed else 0


def _command(session: ChatSession, cmd: str, arg: str) -> None:
    if cmd == "/reset":
        session.reset()
        print("[conversation reset]", flush=True)
    elif cmd in ("/save", "/load"):
        if not arg:
            raise MlxLlamaError(f"usage: {cmd} FILE")
        if cmd == "/save":
            session.save(arg)
            print(f"[saved {arg}: {len(session.messages)} messages, {len(session.cached_tokens)} tokens]", flush=True)
        else:
            session.load(arg)
            print(f"[loaded {arg}: {len(session.messages)} messages, {len(session.cached_tokens)} tokens]", flush=True)
    else:
        raise MlxLlamaError(f"unknown command {cmd} (commands: {COMMANDS})")


def chat_main(argv=None) -> int:
    from .cli import _run

    return _run(_chat, argv)


if __name__ == "__main__":
    sys.exit(chat_main())

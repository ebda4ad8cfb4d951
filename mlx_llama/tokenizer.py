"""Tokenizers: a Hugging Face ``tokenizer.json`` or a SentencePiece ``tokenizer.model`` behind one small class.

Both kinds encode special-token strings in a text ("<s>", "<|im_end|>") to their single ids and decode them back
to that text, so ``decode(encode(x, add_bos=False)) == x``. BOS is added here, never by the backend: that is
what keeps a prompt from starting with two.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import sentencepiece
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import MlxLlamaError

# Files a converter copies alongside the weights (those that exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "added_tokens.json")


class TokenizerError(MlxLlamaError):
    pass


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError covers bad UTF-8 and bad JSON
        raise TokenizerError(f"{path}: cannot read ({_first_line(e)})") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(value) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ..., "lstrip": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _ids(value, source: str) -> set[int]:
    """eos_token_id in config.json and generation_config.json: an id, a list of ids, or null."""
    if value is None:
        return set()
    if _is_id(value):
        return {value}
    if isinstance(value, (list, tuple, set)) and all(_is_id(i) for i in value):
        return set(value)
    raise TokenizerError(f"{source}: eos_token_id = {value!r} must be a token id or a list of token ids")


class _HFBackend:
    """A ``tokenizers`` tokenizer.json: byte-level BPE (Llama 3) or a converted SentencePiece model (Llama 2)."""

    def __init__(self, path: Path):
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # a bare Exception, for unreadable and malformed files alike
            raise TokenizerError(f"{path}: cannot read ({_first_line(e)})") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # A ByteFallback decoder (Llama 2's) turns a whole run of <0xNN> tokens into U+FFFD when one byte in it is
        # out of place; streaming waits for the end of such runs.
        self.byte_runs = self._tok.decoder is not None and b"ByteFallback" in self._tok.decoder.__getstate__()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_byte(self, i: int) -> bool:
        return re.fullmatch(r"<0x[0-9A-F]{2}>", self._tok.id_to_token(i) or "") is not None

    def adds_bos(self, bos_id: int | None) -> bool:
        """Whether the post-processor prepends BOS: how a tokenizer.json says "add BOS by default"."""
        return bos_id is not None and self._tok.encode("a").ids[:1] == [bos_id]


class _SPBackend:
    """A SentencePiece tokenizer.model (Llama 1/2, Mistral), plus tokens Hugging Face added on top of it."""

    byte_runs = False  # sentencepiece decodes each stray byte to one U+FFFD, leaving its neighbours alone

    def __init__(self, path: Path, added: dict[str, int]):
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except Exception as e:  # OSError when unreadable, RuntimeError when not a model
            raise TokenizerError(f"{path}: cannot read ({_first_line(e)})") from e
        self._n = self._sp.get_piece_size()
        # sentencepiece spells "<s>" in a text as three pieces and decodes the BOS id to "": split control pieces
        # and added tokens out of the text ourselves, as `tokenizers` does with its special tokens.
        self._special = {self._sp.id_to_piece(i): i for i in range(self._n) if self._sp.is_control(i)} | added
        self._special_text = {i: t for t, i in self._special.items()}
        longest_first = sorted(self._special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None
        self.vocab_size = max([self._n, *(i + 1 for i in added.values())])
        self.bos_token, self.eos_token = (self._sp.id_to_piece(i) if i >= 0 else None
                                          for i in (self._sp.bos_id(), self._sp.eos_id()))

    def encode(self, text: str) -> list[int]:
        ids = []
        for k, part in enumerate(self._split.split(text) if self._split else [text]):
            if k % 2:  # odd positions hold what the split matched
                ids.append(self._special[part])
            elif part:
                ids += self._sp.encode(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        # The inverse of encode: each run between special tokens decodes on its own (dropping, like each encoded
        # segment, its dummy-prefix space). Ids past the vocabulary decode to nothing.
        out, run = [], []
        for i in ids:
            if 0 <= i < self._n and i not in self._special_text:
                run.append(i)
            else:
                out += [self._sp.decode(run), self._special_text.get(i, "")]
                run = []
        return "".join(out) + self._sp.decode(run)

    def token_to_id(self, token: str) -> int | None:
        i = self._special.get(token, self._sp.piece_to_id(token))  # piece_to_id gives unk for unknown pieces
        return i if token in self._special or self._sp.id_to_piece(i) == token else None


def _chat_template(model_dir: Path, config: dict) -> tuple[str | None, Path]:
    """The chat template and its file: chat_template.jinja, else chat_template.json, else tokenizer_config.json."""
    source, template = model_dir / "tokenizer_config.json", config.get("chat_template")
    if (model_dir / "chat_template.json").is_file():
        source = model_dir / "chat_template.json"
        template = _read_json(source).get("chat_template")
    if (model_dir / "chat_template.jinja").is_file():
        source = model_dir / "chat_template.jinja"
        try:
            template = source.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{source}: cannot read ({_first_line(e)})") from e
    if isinstance(template, list):  # named templates ("default", "tool_use", ...): we only chat
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return (template if isinstance(template, str) and template.strip() else None), source  # "" means none


def load_tokenizer(model_dir, eos_token_ids=()) -> "Tokenizer":
    """Load the tokenizer in ``model_dir``; ``eos_token_ids`` (e.g. config.json's) join the stop set."""
    model_dir = Path(model_dir)
    # Older repos name bos/eos only in special_tokens_map.json; tokenizer_config.json wins where both do.
    config = {**_read_json(model_dir / "special_tokens_map.json"), **_read_json(model_dir / "tokenizer_config.json")}
    bos_token, eos_token = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    if (model_dir / "tokenizer.json").is_file():
        backend = _HFBackend(model_dir / "tokenizer.json")
    elif (model_dir / "tokenizer.model").is_file():
        added = {t: int(i) for t, i in _read_json(model_dir / "added_tokens.json").items()}
        added |= {_token_text(t): int(i) for i, t in (config.get("added_tokens_decoder") or {}).items()}
        backend = _SPBackend(model_dir / "tokenizer.model", {t: i for t, i in added.items() if t})
        bos_token, eos_token = bos_token or backend.bos_token, eos_token or backend.eos_token
    else:
        raise TokenizerError(f"{model_dir}: no tokenizer found (tokenizer.json or tokenizer.model)")

    bos_id = backend.token_to_id(bos_token) if bos_token else None
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):  # Llama's SentencePiece models always wanted BOS
        add_bos = backend.adds_bos(bos_id) if isinstance(backend, _HFBackend) else bos_id is not None
    gen_config = model_dir / "generation_config.json"
    eos_ids = _ids(eos_token_ids, "config.json") | _ids(_read_json(gen_config).get("eos_token_id"), str(gen_config))
    eos_id = backend.token_to_id(eos_token) if eos_token else None
    return Tokenizer(backend, bos_token if bos_id is not None else None, bos_id, add_bos, eos_token,
                     eos_ids | ({eos_id} if eos_id is not None else set()), *_chat_template(model_dir, config))


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, > and & for HTML, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Tokenizer:
    """Encode, decode and chat-format text for one model. Build it with ``load_tokenizer``."""

    def __init__(self, backend, bos_token, bos_token_id, add_bos_token, eos_token, eos_token_ids,
                 chat_template=None, template_source=None):
        self._backend = backend
        self.bos_token: str | None = bos_token
        self.bos_token_id: int | None = bos_token_id
        self.add_bos_token: bool = add_bos_token
        self.eos_token: str | None = eos_token
        self.eos_token_ids: set[int] = set(eos_token_ids)
        self.vocab_size: int = backend.vocab_size
        self.chat_template: str | None = chat_template
        self._template_source = template_source
        self._template = None  # compiled on first use: a broken template only matters to those who chat

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; ``add_bos=None`` follows the tokenizer's own default."""
        ids = list(self._backend.encode(text))
        add_bos = self.add_bos_token if add_bos is None else add_bos
        # A text that starts with the BOS token already (a template wrote it) keeps just that one.
        if add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids) -> str:
        """Text of ``ids``, special tokens included, spaces left as they are (no clean-up)."""
        return self._backend.decode([int(i) for i in ids])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the model's Jinja chat template, in the environment Hugging Face uses."""
        if self.chat_template is None:
            where = self._template_source.parent if self._template_source else "tokenizer"
            raise TokenizerError(f"{where}: no chat template (in tokenizer_config.json or chat_template.jinja)")
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        try:
            if self._template is None:
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=["jinja2.ext.loopcontrols"])
                env.filters["tojson"] = _tojson
                env.globals.update(raise_exception=_raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
                self._template = env.from_string(self.chat_template)
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in specials.items() if v is not None})
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self._template_source}: chat template: {_first_line(e)}") from e

    def encode_chat(self, prompt: str, system_prompt: str | None = None, use_template: bool = True) -> list[int]:
        """Token ids of a one-turn chat: through the chat template if there is one and ``use_template``."""
        if self.chat_template is None or not use_template:
            return self.encode(f"{system_prompt}\n\n{prompt}" if system_prompt else prompt)
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        text = self.apply_chat_template(messages + [{"role": "user", "content": prompt}])
        # Most templates write the BOS text themselves; adding BOS as well would give the model two.
        writes_bos = self.bos_token is not None and text.startswith(self.bos_token)
        return self.encode(text, add_bos=False if writes_bos else None)

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns ids into text one at a time; everything returned, joined, equals ``tokenizer.decode(all_ids)``.

    Each step decodes a small window, a few tokens already shown and then the new ones, and returns what it adds
    past the shown text. The shown part is the shortest tail of the last window that decodes on its own without
    a leading U+FFFD: one token, so that SentencePiece, which drops a leading space only at the start of a decode,
    keeps the space a piece has mid-text; or the byte tokens of the last character. Text ending in U+FFFD is held
    back, as it may be a character whose last bytes have not arrived yet.
    """

    _CONTEXT = 4  # a UTF-8 character is at most 4 bytes, hence at most 4 byte tokens
    _MAX_RUN = 32  # a byte run this long is shown before it ends (at a character's end)
    _MAX_WINDOW = _MAX_RUN + _CONTEXT  # longer and still ending in U+FFFD: stray bytes, not a character

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode
        self._backend = tokenizer._backend
        self._window: list[int] = []
        self._shown = 0  # characters of decode(self._window) already returned
        self._text = ""

    @property
    def text(self) -> str:
        """All text returned so far."""
        return self._text

    def _emit(self, window_text: str, end: int) -> str:
        new = window_text[self._shown:end]
        self._shown = max(self._shown, end)
        self._text += new
        return new

    def add_token(self, token_id: int) -> str:
        """Add one id; return the text it completes (maybe "")."""
        window = self._window
        window.append(int(token_id))
        if self._backend.byte_runs and len(window) <= self._MAX_RUN and self._backend.is_byte(window[-1]):
            return ""  # a byte run decodes all or nothing: an unfinished character would spoil all of it
        text = self._decode(window)
        held = len(text) - len(text.rstrip("\ufffd"))
        if held and len(window) <= self._MAX_WINDOW:
            return self._emit(text, len(text) - held)
        if held:
            # Bytes that never make a character (a model emitting stray bytes). Only the last 3 bytes can still
            # change the text and the last 4 tokens hold them: keep those, show the rest. (Exact for byte-level
            # BPE and SentencePiece, which decode bad bytes locally; a byte-fallback tokenizer.json may differ.)
            tail = self._decode(window[-self._CONTEXT:])
            held = min(held, len(tail) - len(tail.rstrip("\ufffd")), 3)
            new = self._emit(text, len(text) - held)
            self._window, self._shown = window[-self._CONTEXT:], len(tail) - held
            return new
        new = self._emit(text, len(text))
        clean = (k for k in range(1, self._CONTEXT + 1) if not self._decode(window[-k:]).startswith("\ufffd"))
        self._window = window[-next(clean, 1):]  # no clean start within reach (a literal U+FFFD): one token
        self._shown = len(self._decode(self._window))
        return new

    def finalize(self) -> str:
        """Return whatever is still held back (an unfinished character stays U+FFFD, as in decode)."""
        text = self._decode(self._window)
        return self._emit(text, len(text))

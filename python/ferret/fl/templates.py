"""How an example becomes tokens: the prompt format shared by training, eval loss, Rouge-L and MMLU.

Two formats, chosen by the ``template`` setting (:func:`prompt_format`):

- :class:`PlainFormat`: the ``### Instruction:`` / ``### Input:`` / ``### Response:`` template of
  the papers' code, for base models (and tokenizers without a chat template);
- :class:`ChatFormat`: the tokenizer's own chat template (or a Jinja template from a file),
  rendered by ``transformers``. The loss covers the assistant's turns only (their text and the
  template's end-of-turn marker), and generation stops at the end of the assistant's turn.

Both give the same three things: :meth:`encode` (input ids and labels, -100 off the assistant's
tokens), :meth:`prompt_ids` (what a model continues from at evaluation) and ``stop_ids`` (the
tokens that end a generated answer). A prompt longer than ``max_prompt`` tokens loses the end of
its user text, never the header that opens the answer.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import signal
import threading
from pathlib import Path

from .data import DataError, Example
from .settings import ConfigError

TEMPLATES = ("auto", "chat", "plain")  # or the path of a Jinja chat template
IGNORE = -100
RENDER_SECONDS = 5.0  # one conversation renders in well under a millisecond; a template slower than this loops


def prompt_format(tokenizer, template="auto") -> "PlainFormat | ChatFormat":
    """The format ``template`` names for ``tokenizer``: ``"auto"`` (its chat template when it has
    one, else plain), ``"chat"``, ``"plain"`` or the path of a Jinja chat template file; a format
    object is returned as it is. Raises :class:`ConfigError` for ``"chat"`` on a tokenizer without
    a chat template, or a template file that is missing, unreadable or not a usable chat template."""
    if isinstance(template, (PlainFormat, ChatFormat)):
        return template
    template = str(template)
    if template == "plain" or (template == "auto" and not getattr(tokenizer, "chat_template", None)):
        return PlainFormat(tokenizer)
    if template in ("auto", "chat"):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template 'chat': the model's tokenizer has no chat template; use template = 'plain' "
                              "or the path of a Jinja chat template")
        return ChatFormat(tokenizer)
    path = Path(template)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"template {template!r}: cannot read a Jinja chat template there ({err})") from None
    return ChatFormat(tokenizer, text, name=str(path))


class PlainFormat:
    """The ``### Instruction:`` template (see the module docstring)."""

    name = "plain"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = [tokenizer.eos_token_id]
        self._header_tokens = len(self._tokens("### Response:\n"))

    def encode(self, ex: Example, max_prompt: int, max_length: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) of ``ex``: the prompt, then the response and EOS, which alone carry
        labels; at most ``max_length`` tokens."""
        prompt = self.prompt_ids(ex, max_prompt)
        response = self._tokens(ex.response) + [self.tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        return ids, [IGNORE] * len(prompt) + ids[len(prompt):]

    def prompt_ids(self, ex: Example, max_prompt: int | None = None) -> list[int]:
        """The tokens a model continues from to answer ``ex`` (at most ``max_prompt``)."""
        turns = "".join(f"{content}\n\n" if role == "system" else
                        f"### Instruction:\n{content}\n\n" if role == "user" else f"### Response:\n{content}\n\n"
                        for role, content in ex.history)
        context = f"### Input:\n{ex.context}\n\n" if ex.context else ""
        ids = self.tokenizer(f"{turns}### Instruction:\n{ex.instruction}\n\n{context}### Response:\n")["input_ids"]
        return _cut(ids, max_prompt, self._header_tokens)

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class ChatFormat:
    """A chat template (see the module docstring): the tokenizer's own, or ``template`` (Jinja text)."""

    def __init__(self, tokenizer, template: str | None = None, name: str = "chat"):
        self.tokenizer, self.template, self.name = tokenizer, template, name
        probe = Example("PROBE-QUESTION", "PROBE-ANSWER", "")
        try:
            segments = self._segments(probe)
        except DataError as err:
            raise ConfigError(str(err)) from None
        except Exception as err:  # jinja2 and transformers raise many kinds; all mean a template we cannot use
            raise ConfigError(f"template {name!r} does not render a conversation: {type(err).__name__}: {err}") from None
        answer = next((text for text, labelled in segments if labelled), "")
        if "PROBE-ANSWER" not in answer or "PROBE-QUESTION" not in segments[0][0]:
            raise ConfigError(f"template {name!r} does not render the user's and the assistant's messages")
        end_of_turn = self._tokens(answer.split("PROBE-ANSWER", 1)[1])[:1]
        self.stop_ids = list(dict.fromkeys([tokenizer.eos_token_id, *end_of_turn]))
        prompt_text = segments[0][0]
        # the tokens after the user's text, which open the answer: a cut prompt keeps them
        question_end = prompt_text.rindex("PROBE-QUESTION") + len("PROBE-QUESTION")
        whole = self._tokens_with_pieces([(prompt_text, False)])[0]
        self._header_tokens = len(whole) - len(self._tokens_with_pieces([(prompt_text[:question_end], False)])[0])

    def encode(self, ex: Example, max_prompt: int, max_length: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) of ``ex`` rendered as a conversation; labels on every assistant turn
        (its text and end-of-turn marker); at most ``max_length`` tokens, the prompt before the
        last answer at most ``max_prompt``. Raises :class:`DataError` if the template renders a
        conversation's turns out of order."""
        ids, labels, answer = self._pieces(ex, max_prompt)
        return (ids + answer)[:max_length], (labels + answer)[:max_length]

    def prompt_ids(self, ex: Example, max_prompt: int | None = None) -> list[int]:
        """The tokens a model continues from to answer ``ex``: the conversation up to the header of
        the assistant's last turn (at most ``max_prompt``)."""
        return self._pieces(ex, max_prompt)[0]

    def _pieces(self, ex: Example, max_prompt: int | None) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, their labels, the last answer's ids): earlier assistant turns carry labels.
        The conversation is tokenised whole, as the model reads it, and each token takes the kind
        of the piece its first character lies in."""
        segments = self._segments(ex)
        ids, owner = self._tokens_with_pieces(segments)
        last = len(segments) - 1  # the last answer's piece
        answer_start = owner.index(last) if last in owner else len(ids)
        labels = [t if segments[piece][1] else IGNORE for t, piece in zip(ids, owner)]
        prompt, prompt_labels = ids[:answer_start], labels[:answer_start]
        if max_prompt is not None and len(prompt) > max_prompt:
            prompt = _cut(prompt, max_prompt, self._header_tokens)
            prompt_labels = _cut(prompt_labels, max_prompt, self._header_tokens)
        return prompt, prompt_labels, ids[answer_start:]

    def _tokens_with_pieces(self, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """The ids of the segments' joined text, and for each the index of the segment it starts in."""
        text = "".join(piece for piece, _ in segments)
        if not getattr(self.tokenizer, "is_fast", False):  # no offsets: tokenise piece by piece
            ids, owner = [], []
            for k, (piece, _) in enumerate(segments):
                tokens = self._tokens(piece)
                ids, owner = ids + tokens, owner + [k] * len(tokens)
            return ids, owner
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = list(itertools.accumulate(len(piece) for piece, _ in segments))
        return encoded["input_ids"], [bisect.bisect_right(ends, start) for start, _ in encoded["offset_mapping"]]

    def _segments(self, ex: Example) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is an assistant's answer) pieces."""
        user = f"{ex.instruction}\n\n{ex.context}" if ex.context else ex.instruction
        turns = [{"role": role, "content": content} for role, content in ex.history]
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": ex.response}]
        pieces, done = [], ""
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = self._render(turns[:i], generation_prompt=True)
            through = self._render(turns[: i + 1], generation_prompt=False)
            if not (before.startswith(done) and through.startswith(before)):
                raise DataError(f"template {self.name!r} renders the turns of a conversation out of order; "
                                f"ferret needs each turn to extend the text before it")
            pieces += [(before[len(done):], False), (through[len(before):], True)]
            done = through
        return pieces

    def _render(self, turns: list[dict], generation_prompt: bool) -> str:
        with _time_limit(RENDER_SECONDS, f"template {self.name!r} took more than {RENDER_SECONDS:g} s to render "
                                         f"one conversation: it loops too much to train on"):
            return self.tokenizer.apply_chat_template(turns, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


@contextlib.contextmanager
def _time_limit(seconds: float, message: str):
    """Raise :class:`DataError` with ``message`` if the body runs longer than ``seconds`` (a
    Jinja template is a program: a loop in it can run for hours). Bounded in the main thread,
    where signals arrive; elsewhere the body runs unbounded."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise DataError(message)

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _cut(ids: list, max_prompt: int | None, tail: int) -> list:
    """``ids`` cut to ``max_prompt`` items by dropping what comes just before its last ``tail``
    (the header that opens the answer), so a cut prompt still ends with the header."""
    if max_prompt is None or len(ids) <= max_prompt:
        return ids
    keep = max(max_prompt - tail, 0)
    return ids[:keep] + ids[len(ids) - (max_prompt - keep):]

"""A tiny character-level language model that samples with live settings from a hotknob daemon.

Run a daemon first (``hotknob run --app demo --config examples/config.yaml
--etcd-endpoints 127.0.0.1:2379``), then ``python examples/generate.py --app demo
--requests 5 --token-delay 0.02``; while it writes, change a knob with
``hotknob set --app demo --etcd-endpoints 127.0.0.1:2379 sampling.temperature=0``
and the next token is drawn greedily. A change lands at a token boundary, never
inside a token: ``live.apply(i)`` runs just before global token ``i`` is drawn.

The model is a small GRU trained for a few seconds on the paragraphs below
(``--train-seconds 0`` keeps its random weights). Each request prints its
sampling settings, then the text as it is drawn, with ``[vN: key=value]`` where
a change took effect (``[vN: max_new_tokens=... ends the request]`` where a
change ends a request). ``--log FILE`` writes one JSON object per token.

Sampling values follow :mod:`hotknob.model_runtime.sampling`'s rules: ``None``
means a knob's "off" value where it has one, an invalid update is refused whole
(reported in the ack, previous params kept), a removed key keeps the value in
force with a warning. :class:`LiveSampling` lives there now.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hotknob.model_runtime import DaemonUnavailable, LiveConfig
from hotknob.model_runtime.errors import InvalidValue
from hotknob.model_runtime.sampling import LiveSampling, SamplingParams, sample

CORPUS = """\
The harbour town woke before the sun. Fishing boats left the quay in a long line,
their lamps swinging, and the gulls followed them out past the breakwater. On the
hill above the harbour the baker opened his shutters and set the first loaves on
the sill to cool, and the smell of bread drifted down the narrow streets.

When the tide turned, the boats came back heavy and slow. The children ran along
the wall to count them, and the old men on the bench argued about the weather,
as they did every morning, and agreed about nothing. A cart rattled over the
stones with barrels of salt, and a dog chased it as far as the church and no farther.

In the afternoon the wind rose from the west. The sails in the harbour snapped
and the water turned from green to grey. The keeper of the light climbed the
tower early, polished the great lens, and trimmed the wick, because a storm was
coming and the ships at sea would need to see the rocks before the rocks saw them.

By evening the rain had come. The streets were empty and the windows were gold.
In the inn by the water a fiddler played an old tune, and the sailors sang the
words they remembered and hummed the ones they had forgotten. The fire was warm,
the soup was hot, and nobody asked about tomorrow.

Late in the night the storm passed over the town and went out to sea. The keeper
watched the last cloud slide under the moon. Then the light turned and turned,
the harbour slept, and the town waited for the sun to come up once more.
"""

PROMPTS = ("The ", "When the ", "In the ", "A ")
PENALTY_WINDOW = 32


class CharModel(nn.Module):
    """A character-level GRU language model over a fixed alphabet.

    ``forward(ids, state)`` takes ``[batch, seq]`` token ids and returns the
    next-token logits ``[batch, seq, vocab]`` and the new recurrent state, so
    generation feeds one token at a time and never re-reads its context.
    """

    def __init__(self, alphabet: str, embed_dim: int = 32, hidden_dim: int = 128) -> None:
        super().__init__()
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError("the alphabet must be non-empty, with each character once")
        self.alphabet = alphabet
        self._ids = {ch: i for i, ch in enumerate(alphabet)}
        self.embed = nn.Embedding(len(alphabet), embed_dim)
        self.rnn = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        self.head = nn.Linear(hidden_dim, len(alphabet))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def forward(self, ids: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out, state = self.rnn(self.embed(ids), state)
        return self.head(out), state

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; ``ValueError`` names the first character not in the alphabet."""
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the model's alphabet") from exc

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


def build_model(
    seed: int, train_seconds: float, *, text: str = CORPUS, seq_len: int = 64, batch: int = 32
) -> CharModel:
    """A ``CharModel`` over ``text``'s characters, trained on it for about ``train_seconds``.

    ``train_seconds <= 0`` returns the seeded random initialisation at once.
    The global torch RNG is left as it was; the same seed gives the same
    initial weights and the same batches (training time still varies, so a
    trained model is only as reproducible as the number of steps it got).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CharModel("".join(sorted(set(text))))
    if train_seconds > 0:
        _train(model, text, train_seconds, seed, seq_len, batch)
    return model.eval()


def _train(
    model: CharModel, text: str, seconds: float, seed: int, seq_len: int, batch: int
) -> None:
    data = torch.tensor(model.encode(text), dtype=torch.long)
    if data.numel() <= seq_len + 1:
        raise ValueError(f"the training text needs more than {seq_len + 1} characters")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch, 1), generator=generator)
        window = data[starts + offsets]
        logits, _ = model(window[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, model.vocab_size), window[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One drawn token and everything that decided it.

    ``index`` is the global token boundary (the step given to ``live.apply``
    just before this token was drawn); ``position`` counts within the request.
    ``logits`` are the model's raw next-token logits ``[vocab]``; ``params`` and
    ``version`` are what was in force for this token; ``applied`` says a new
    configuration was applied at this token's boundary.
    """

    index: int
    position: int
    token: int
    logits: Tensor
    params: SamplingParams
    version: int
    applied: bool


@contextmanager
def _live_sampling(live: LiveConfig, given: LiveSampling | None) -> Iterator[LiveSampling]:
    if given is not None:
        yield given
        return
    sampling = LiveSampling(live)
    try:
        yield sampling
    finally:
        sampling.close()


def generate(
    live: LiveConfig,
    model: CharModel,
    n_tokens: int | None,
    generator: torch.Generator,
    on_token: Callable[[TokenEvent], None] | None = None,
    *,
    prompt: str = "\n",
    first_index: int = 0,
    sampling: LiveSampling | None = None,
) -> list[int]:
    """Draw up to ``n_tokens`` tokens after ``prompt`` (``None``: up to the live
    ``sampling.max_new_tokens``) and return their ids.

    Before token ``i`` (global index ``first_index + position``) this calls
    ``live.apply(i)``: a change pending there is in force for token ``i`` and
    after, never for part of a token. The repetition penalty sees the last
    ``PENALTY_WINDOW`` tokens of prompt and output. ``on_token`` runs after
    each token is drawn, before the next boundary. Pass a long-lived
    ``sampling`` to keep its params across requests; by default one is
    registered for this call and removed at its end.
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one character")
    context = model.encode(prompt)
    out: list[int] = []
    with _live_sampling(live, sampling) as params_source, torch.inference_mode():
        logits, state = model(torch.tensor([context], dtype=torch.long))
        last = logits[0, -1]
        while True:
            index = first_index + len(out)
            applied = live.apply(index)
            params = params_source.params
            limit = params.max_new_tokens if n_tokens is None else n_tokens
            if len(out) >= limit:
                return out
            recent = torch.tensor((context + out)[-PENALTY_WINDOW:], dtype=torch.long)
            token = int(sample(last.unsqueeze(0), params, generator, recent)[0])
            out.append(token)
            if on_token is not None:
                event = TokenEvent(index, len(out) - 1, token, last, params, live.version, applied)
                on_token(event)
            logits, state = model(torch.tensor([[token]], dtype=torch.long), state)
            last = logits[0, -1]


def describe(params: SamplingParams, since: SamplingParams | None = None) -> str:
    """``key=value`` for every field, or only those that differ from ``since``."""
    now = dataclasses.asdict(params)
    old = dataclasses.asdict(since) if since is not None else {}
    return " ".join(f"{k}={v:g}" for k, v in now.items() if k not in old or old[k] != v)


class _Printer:
    """Streams a request's text, marking where a new sampling setting took effect."""

    def __init__(
        self,
        model: CharModel,
        request: int,
        log: Any,
        delay: float,
        params: SamplingParams | None = None,
    ) -> None:
        self._model = model
        self._request = request
        self._log = log
        self._delay = delay
        self._params = params

    def finish(self, params: SamplingParams, version: int) -> None:
        """Mark a change that took effect at the boundary that ended the request."""
        if self._params is not None and params is not self._params:
            changed = describe(params, self._params) or "no sampling change"
            if params.max_new_tokens != self._params.max_new_tokens:
                changed += " ends the request"
            print(f"[v{version}: {changed}]", end="", flush=True)
            self._params = params

    def __call__(self, event: TokenEvent) -> None:
        if self._params is not None and event.params is not self._params:
            changed = describe(event.params, self._params) or "no sampling change"
            print(f"[v{event.version}: {changed}]", end="", flush=True)
        self._params = event.params
        char = self._model.decode([event.token])
        print(char, end="", flush=True)
        if self._log is not None:
            record = {
                "request": self._request,
                "token_index": event.index,
                "position": event.position,
                "version": event.version,
                "applied": event.applied,
                "token": event.token,
                "char": char,
                **dataclasses.asdict(event.params),
            }
            self._log.write(json.dumps(record) + "\n")
        if self._delay:
            time.sleep(self._delay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", default=None, help="daemon app name (or HOTKNOB_APP)")
    parser.add_argument("--socket", default=None, help="daemon socket (or HOTKNOB_SOCKET)")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--prompt", default=None, help="start every request with this text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-seconds", type=float, default=5.0)
    parser.add_argument("--no-train", action="store_true", help="keep the random weights")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds to sleep per token")
    parser.add_argument("--log", default=None, help="write one JSON line per token here")
    parser.add_argument("--connect-timeout", type=float, default=30.0, help="seconds")
    args = parser.parse_args(argv)
    # Refused here, in one line (exit 2), not as a traceback part-way through a request:
    # a negative or NaN delay fails in ``time.sleep``, an empty prompt in ``generate``.
    if args.requests < 0:
        parser.error(f"--requests must be 0 or more, got {args.requests}")
    if not 0 <= args.token_delay < math.inf:
        parser.error(f"--token-delay must be 0 or more seconds, got {args.token_delay}")
    if args.prompt == "":
        parser.error("--prompt must hold at least one character")

    model = build_model(args.seed, 0.0 if args.no_train else args.train_seconds)
    prompts = [args.prompt] if args.prompt is not None else list(PROMPTS)
    try:
        for prompt in prompts:
            model.encode(prompt)
    except ValueError as exc:
        print(f"error: --prompt: {exc}", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    try:
        live = LiveConfig.connect(socket=args.socket, app=args.app, timeout=args.connect_timeout)
    except DaemonUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        log = open(args.log, "a", buffering=1) if args.log else None  # noqa: SIM115 - closed below
    except OSError as exc:  # a missing folder, say: one line, and the daemon let go
        print(f"error: --log: {exc}", file=sys.stderr)
        live.close()
        return 1
    try:
        sampling = LiveSampling(live)
    except InvalidValue as exc:
        print(f"error: the daemon's sampling values are refused: {exc}", file=sys.stderr)
        if log:
            log.close()
        live.close()
        return 1
    print(f"connected: version {live.version}", flush=True)
    index = 0
    try:
        for request in range(args.requests):
            live.apply(index)
            prompt = prompts[request % len(prompts)]
            header = describe(sampling.params)
            print(f"\nrequest {request} (v{live.version}: {header})\n{prompt}", end="", flush=True)
            printer = _Printer(model, request, log, args.token_delay, sampling.params)
            tokens = generate(
                live,
                model,
                None,
                generator,
                printer,
                prompt=prompt,
                first_index=index,
                sampling=sampling,
            )
            index += len(tokens)
            printer.finish(sampling.params, live.version)
            print(flush=True)
    finally:
        sampling.close()
        if log:
            log.close()
        live.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sampling: turn next-token logits into tokens, for a whole batch of requests at once.

Each request has its own `SamplingParams`. `BatchSampler` keeps them as per-row tensors (one row
per KV-cache slot), so one step processes the logits of every active request with a handful of
vectorised ops, whatever mix of greedy and sampled requests the batch holds:

    logits -> repetition / frequency / presence penalties -> temperature -> top-k -> top-p
           -> min-p -> greedy argmax, or a random draw from the request's own generator

Rows with neutral settings (penalty 1.0, frequency 0.0, ...) come out bit-identical, so a greedy
request gives the same tokens alone or batched with others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

import torch

from ..errors import UserError


MAX_TOP_LOGPROBS = 20   # OpenAI's limit
# Bounds that keep every value representable in the sampler's float32 / int64 row tensors and the
# logits finite: a value beyond them once raised inside the shared decode step and failed every
# request in flight, so they are refused (or clamped) here, at the request boundary.
MAX_TOP_K = 2**31 - 1               # larger k means "off" anyway; BatchSampler clamps k to the vocabulary
MAX_TEMPERATURE = 100.0             # softmax(logits / 100) is already close to uniform
MIN_TEMPERATURE = 1e-5              # below this, temperature is greedy (as in vLLM); logits / t would overflow
REPETITION_PENALTY_RANGE = (0.01, 100.0)
ADDITIVE_PENALTY_LIMIT = 100.0      # |frequency_penalty|, |presence_penalty| (OpenAI allows 2; the server keeps that)


@dataclass
class SamplingParams:
    """How to pick tokens for one request (names follow OpenAI / Hugging Face)."""

    max_new_tokens: int = 64
    temperature: float = 0.0            # 0 = greedy (argmax)
    top_k: int = 0                      # keep the k most likely tokens; 0 = off
    top_p: float = 1.0                  # keep the smallest set with this much probability; 1 = off
    min_p: float = 0.0                  # drop tokens below min_p * p(most likely); 0 = off
    repetition_penalty: float = 1.0     # CTRL: logits of seen tokens (prompt + output) / penalty (x penalty if < 0)
    frequency_penalty: float = 0.0      # OpenAI: logit -= frequency * (times the token was generated)
    presence_penalty: float = 0.0       # OpenAI: logit -= presence if the token was generated at all
    stop: list[str] = field(default_factory=list)          # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens besides the tokenizer's end tokens
    ignore_eos: bool = False            # keep going past the tokenizer's end tokens (benchmarks)
    seed: int | None = None             # same seed -> same tokens, alone or batched
    logprobs: bool = False              # return the log-probability of each chosen token
    top_logprobs: int = 0               # also the k most likely tokens at each step (implies logprobs)

    def validate(self) -> "SamplingParams":
        """Check every value (type, finite, in range) and normalise it; raise UserError naming the first bad one.

        Floats become plain floats; a positive temperature below MIN_TEMPERATURE becomes 0 (greedy).
        """
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.top_logprobs, int) and not isinstance(self.top_logprobs, bool) and self.top_logprobs:
            self.logprobs = True
        try:
            self._check()
        except UserError as error:
            raise UserError(f"{error}; fix the sampling settings") from None
        return self

    def _check(self) -> None:
        _integer("max_new_tokens", self.max_new_tokens, 1, None, "a positive integer")
        self.temperature = _real("temperature", self.temperature, 0.0, MAX_TEMPERATURE, "(0 = greedy)")
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        _integer("top_k", self.top_k, 0, MAX_TOP_K, f"an integer from 0 (off) to {MAX_TOP_K}")
        self.top_p = _real("top_p", self.top_p, 0.0, 1.0, "(1 = off)", open_low=True)
        self.min_p = _real("min_p", self.min_p, 0.0, 1.0, "(0 = off)")
        low, high = REPETITION_PENALTY_RANGE
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty, low, high, "(1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            setattr(self, name, _real(name, getattr(self, name), -ADDITIVE_PENALTY_LIMIT, ADDITIVE_PENALTY_LIMIT,
                                      "(0 = off)"))
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise UserError("stop must be a list of non-empty strings")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise UserError("stop_token_ids must be token ids (ints >= 0)")
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, not {getattr(self, name)!r}")
        _integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS,
                 f"an integer from 0 to {MAX_TOP_LOGPROBS}")
        # torch generators take 64-bit seeds (signed or unsigned).
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                          and -2**63 <= self.seed < 2**64):
            raise UserError(f"seed must be an integer between -2**63 and 2**64 - 1, not {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


class BatchSampler:
    """Per-row sampling settings and token statistics for the `n_rows` slots of a KV cache.

    `assign(row, ...)` installs a request in a row; `sample(logits, rows)` picks one token for each
    given row from logits [n, V]; `observe(rows, tokens)` updates the counts the penalties use.
    """

    def __init__(self, n_rows: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.vocab_size = vocab_size
        self.temperature = torch.zeros(n_rows, device=device)
        self.top_k = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(n_rows, device=device)
        self.min_p = torch.zeros(n_rows, device=device)
        self.repetition = torch.ones(n_rows, device=device)
        self.frequency = torch.zeros(n_rows, device=device)
        self.presence = torch.zeros(n_rows, device=device)
        self.counts = torch.zeros(n_rows, vocab_size, device=device)              # generated tokens, per row
        self.seen = torch.zeros(n_rows, vocab_size, dtype=torch.bool, device=device)  # prompt + generated
        self.params: list[SamplingParams | None] = [None] * n_rows
        self.generators: list[torch.Generator | None] = [None] * n_rows

    def assign(self, row: int, params: SamplingParams, prompt_ids: list[int], seed: int) -> None:
        self.params[row] = params
        self.temperature[row] = params.temperature
        self.top_k[row] = min(params.top_k, self.vocab_size)   # k >= V keeps every token: the same as off
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.repetition[row] = params.repetition_penalty
        self.frequency[row] = params.frequency_penalty
        self.presence[row] = params.presence_penalty
        if params.penalised:
            self.counts[row] = 0
            self.seen[row] = False
            self.seen[row, torch.tensor(prompt_ids, dtype=torch.long, device=self.seen.device)] = True
        generator = torch.Generator(device=self.temperature.device)
        generator.manual_seed(seed)
        self.generators[row] = generator

    def observe(self, rows: torch.Tensor, tokens: torch.Tensor, row_list: list[int]) -> None:
        """Count the tokens just generated (only rows with penalties need the counts)."""
        if any(self.params[row].penalised for row in row_list):
            self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)
            self.seen[rows, tokens] = True

    def generator_states(self, row_list: list[int]) -> dict[int, torch.Tensor]:
        """The generator states of the seeded, sampled rows (only they promise reproducible draws)."""
        return {row: self.generators[row].get_state() for row in row_list
                if self.params[row].seed is not None and not self.params[row].greedy}

    def restore_generators(self, states: dict[int, torch.Tensor]) -> None:
        """Put back states from `generator_states`, e.g. to sample the same rows again after a failure."""
        for row, state in states.items():
            self.generators[row].set_state(state)

    def pick(self, logits: torch.Tensor, rows: torch.Tensor, row_list: list[int]
             ) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
        """`sample` as Python values, one (token, log-prob, top (id, log-prob) alternatives) per row,
        then `observe` the tokens (last, so that a failure before it leaves the counts untouched)."""
        tokens, logprobs, top = self.sample(logits, rows, row_list)
        token_list = tokens.tolist()
        logprob_list = logprobs.tolist() if logprobs is not None else [None] * len(row_list)
        if top is not None:
            top_list = [list(zip(ids, values)) for ids, values in zip(top[1].tolist(), top[0].tolist())]
        else:
            top_list = [None] * len(row_list)
        self.observe(rows, tokens, row_list)
        return list(zip(token_list, logprob_list, top_list))

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: torch.Tensor, row_list: list[int]
               ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """logits [n, V] for cache rows `rows` [n] -> (tokens [n], log-probs of those tokens [n] or
        None, the k most likely (log-probs [n, k], token ids [n, k]) or None), where k is the largest
        top_logprobs among the rows.

        Log-probs are the model's own distribution (log-softmax of the raw logits), before any
        penalty, temperature or truncation changes it.
        """
        logits = logits.float()
        params = [self.params[row] for row in row_list]
        raw = logits
        if any(p.penalised for p in params):
            logits = self._penalise(logits, rows)
        tokens = logits.argmax(dim=-1)
        sampled = [index for index, p in enumerate(params) if not p.greedy]
        if sampled:
            # Only the non-greedy rows pay for filtering and noise.
            index = torch.tensor(sampled, device=logits.device)
            sub_rows = rows[index]
            scaled = logits[index] / self.temperature[sub_rows, None]
            scaled = filter_logits(scaled, self.top_k[sub_rows], self.top_p[sub_rows], self.min_p[sub_rows],
                                   [params[i] for i in sampled])
            tokens[index] = self._draw(scaled, [row_list[i] for i in sampled])
        logprobs = top = None
        if any(p.logprobs or p.top_logprobs for p in params):
            log_probs = raw.log_softmax(dim=-1)
            logprobs = log_probs.gather(1, tokens[:, None])[:, 0]
            k = max(p.top_logprobs for p in params)
            if k:
                top = log_probs.topk(k, dim=-1)
        return tokens, logprobs, top

    def _penalise(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        repetition = self.repetition[rows, None]
        seen = self.seen[rows]
        # CTRL (Keskar et al. 2019): make seen tokens less likely whatever the logit's sign.
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalised, logits)
        counts = self.counts[rows]
        return logits - self.frequency[rows, None] * counts - self.presence[rows, None] * (counts > 0).float()

    def _draw(self, logits: torch.Tensor, row_list: list[int]) -> torch.Tensor:
        """Sample from softmax(logits) per row by inverting its CDF at one uniform number.

        The uniform comes from each request's own generator, so a seeded request draws the same
        numbers whatever else is in the batch. One number per row, not one per vocabulary entry
        (the Gumbel-max trick's argmax(logits + noise) needs V exponentials per row, which was 12%
        of a 16-row SmolLM2 decode step on CPU).
        """
        uniforms = torch.cat([torch.rand(1, generator=self.generators[row], device=logits.device) for row in row_list])
        cdf = logits.softmax(dim=-1).cumsum(dim=-1)                               # [n, V]
        # right=True: the first token whose cumulative mass exceeds u * total. Filtered tokens
        # (probability 0) never start a new step of the CDF, so they cannot be picked.
        tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
        return tokens.clamp_max(logits.shape[-1] - 1)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  params: list[SamplingParams]) -> torch.Tensor:
    """Set to -inf the logits [n, V] that top-k [n], top-p [n] and min-p [n] rule out, per row.

    As in Hugging Face, top-p is measured on the distribution left after top-k.
    """
    vocab_size = logits.shape[-1]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab_size, device=logits.device)[None]
        remove = (top_k[:, None] > 0) & (rank >= top_k[:, None])
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs           # probability of the tokens ranked above
        # The top token always survives: its mass_before is 0 < top_p.
        remove = (top_p[:, None] < 1.0) & (mass_before >= top_p[:, None])
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(p.min_p > 0 for p in params):
        probs = logits.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def _integer(name: str, value: object, low: int, high: int | None, expected: str) -> None:
    """Raise UserError unless `value` is an int (not a bool) in [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        raise UserError(f"{name} must be {expected}, not {value!r}")


def _real(name: str, value: object, low: float, high: float, note: str, open_low: bool = False) -> float:
    """`value` as a float if it is a finite real number in [low, high] ((low, high] with open_low)."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
    if not isinstance(value, Real) or isinstance(value, bool):
        raise UserError(f"{name} must be a number in {interval} {note}, not {value!r}")
    try:
        number = float(value)
    except (OverflowError, ValueError):   # an int beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise UserError(f"{name} must be a finite number in {interval} {note}, not {value!r}")
    if not (low < number <= high if open_low else low <= number <= high):
        raise UserError(f"{name} must be in {interval} {note}, not {value!r}")
    return number

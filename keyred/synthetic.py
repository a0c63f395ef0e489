"""A seeded synthetic token source: a sparse first-order Markov chain.

Each token has `successors` possible next tokens with random (Dirichlet) probabilities, so the
best possible loss (the chain's entropy rate) is far below log(vocab_size) and known exactly:
a model that learns shows it in the loss table. Needs no network and no files.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class MarkovSettings:
    vocab_size: int = 256
    successors: int = 4
    seed: int = 1234


class MarkovChain:
    """Transition table: `next_tokens` [V, S] (long) with probabilities `probs` [V, S]."""

    def __init__(self, settings: MarkovSettings):
        if settings.successors > settings.vocab_size:
            raise ValueError(f"data.successors ({settings.successors}) must not exceed "
                             f"data.vocab_size ({settings.vocab_size})")
        generator = torch.Generator().manual_seed(settings.seed)
        vocab, succ = settings.vocab_size, settings.successors
        self.vocab_size = vocab
        self.next_tokens = torch.stack([torch.randperm(vocab, generator=generator)[:succ] for _ in range(vocab)])
        concentration = torch.ones(succ)
        gamma = torch._standard_gamma(concentration.expand(vocab, succ).contiguous(), generator=generator)
        self.probs = gamma / gamma.sum(-1, keepdim=True)

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """Token ids [batch_size, seq_len], the first token uniform."""
        tokens = torch.empty(batch_size, seq_len, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.vocab_size, (batch_size,), generator=generator)
        for t in range(1, seq_len):
            choice = torch.multinomial(self.probs[tokens[:, t - 1]], 1, generator=generator).squeeze(-1)
            tokens[:, t] = self.next_tokens[tokens[:, t - 1], choice]
        return tokens

    def entropy_rate(self) -> float:
        """Entropy per token (nats) under the stationary distribution: the lowest reachable loss."""
        transition = torch.zeros(self.vocab_size, self.vocab_size, dtype=torch.float64)
        transition.scatter_add_(1, self.next_tokens, self.probs.double())
        stationary = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        for _ in range(1000):
            stationary = stationary @ transition
        row_entropy = -(self.probs.double() * self.probs.double().clamp_min(1e-30).log()).sum(-1)
        return float(stationary @ row_entropy)

"""How `select` picks a choice from per-token logprobs (SGLang's choices methods, as small objects).

Each method sees, per choice, the logprobs of the choice's tokens given the prefix; the scoring
request is the same for all of them, so they differ only here."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict = field(default_factory=dict)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


class ChoicesSamplingMethod:
    requires_unconditional_logprobs = False

    def scores(self, token_logprobs: list[list[float]], unconditional: list[list[float]] | None) -> list[float]:
        raise NotImplementedError

    def __call__(self, choices: list[str], token_logprobs: list[list[float]],
                 unconditional: list[list[float]] | None = None) -> ChoicesDecision:
        scores = self.scores(token_logprobs, unconditional)
        best = max(range(len(choices)), key=lambda i: scores[i])
        meta = {"normalized_prompt_logprobs": [_mean(lp) for lp in token_logprobs],
                "input_token_logprobs": token_logprobs, "scores": scores}
        if unconditional is not None:
            meta["unconditional_token_logprobs"] = unconditional
        return ChoicesDecision(choices[best], meta)


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The highest mean token logprob: long choices are not penalised for their length."""

    def scores(self, token_logprobs, unconditional):
        return [_mean(lp) for lp in token_logprobs]


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Token by token, keep the choices with the best logprob at that position (shorter choices
    are padded with their mean), until one is left: favours the choice the model would start."""

    def scores(self, token_logprobs, unconditional):
        width = max(len(lp) for lp in token_logprobs)
        rows = [lp + [_mean(lp)] * (width - len(lp)) for lp in token_logprobs]
        alive = list(range(len(rows)))
        for j in range(width):
            best = max(rows[i][j] for i in alive)
            alive = [i for i in alive if rows[i][j] == best]
            if len(alive) == 1:
                break
        return [1.0 if i == alive[0] else 0.0 for i in range(len(rows))]


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """Mean of (logprob given the prefix - logprob given no context): discounts choices that are
    likely whatever the question was."""

    requires_unconditional_logprobs = True

    def scores(self, token_logprobs, unconditional):
        if unconditional is None:
            raise ValueError("unconditional_likelihood_normalized needs the unconditional logprobs")
        return [_mean([a - b for a, b in zip(lp, un)]) for lp, un in zip(token_logprobs, unconditional)]


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()

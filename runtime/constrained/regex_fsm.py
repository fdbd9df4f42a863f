"""The character-level view of a regex (interegular) that outlines-core's token index lacks:
follows the text generated so far and reads off the string every continuation must start with."""

from __future__ import annotations

import interegular
from interegular.fsm import anything_else


class ForcedStrings:
    """A regex's DFA over characters, with dead states pruned so they never count as a choice."""

    def __init__(self, regex: str):
        fsm = interegular.parse_pattern(regex).to_fsm()
        self.initial, self.finals = fsm.initial, fsm.finals
        chars = fsm.alphabet.by_transition
        self.map = fsm.map
        self.alphabet = fsm.alphabet
        live = set(self.finals)
        changed = True
        while changed:  # states from which a final state is reachable
            changed = False
            for s, trans in fsm.map.items():
                if s not in live and any(n in live for n in trans.values()):
                    live.add(s)
                    changed = True
        self.forced: dict = {}  # state -> (char, next state) when exactly one live move exists
        for s, trans in fsm.map.items():
            moves = [(c, n) for c, n in trans.items() if n in live]
            if s not in self.finals and len(moves) == 1:
                syms = chars[moves[0][0]]
                if len(syms) == 1 and syms[0] is not anything_else:
                    self.forced[s] = (syms[0], moves[0][1])

    def step(self, state, text: str):
        """The state after `text`, or None if the regex cannot continue so."""
        for ch in text:
            cls = self.alphabet[ch] if ch in self.alphabet else self.alphabet[anything_else]
            state = self.map.get(state, {}).get(cls)
            if state is None:
                return None
        return state

    def forced_string(self, state, limit: int = 256) -> str:
        out = []
        while state in self.forced and len(out) < limit:
            ch, state = self.forced[state]
            out.append(ch)
        return "".join(out)

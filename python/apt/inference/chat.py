"""A chat loop over a language model.

The prompt is a plain transcript: an optional system line, then the turns as ``User: ...`` / ``Assistant: ...``
lines, ending with ``Assistant:`` for the model to continue. A reply ends at end-of-text, at a new ``\\nUser:``
line, or after ``max_new_tokens``. History is kept within the model's window: the oldest turns are dropped until
the prompt plus ``max_new_tokens`` fits (the system line is kept).

:func:`run_chat` reads messages line by line from a stream (stdin in ``apt chat``); ``/exit`` or ``/quit`` or
end of input ends it, ``/reset`` clears the history, ``/help`` lists the commands.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, TextIO, Union

import torch

from ..plugins.base import Plugin
from ..plugins.manager import PluginManager
from .generate import generate, model_window
from .sampling import check_temperature, check_top_k_top_p

logger = logging.getLogger(__name__)

HELP = "commands: /exit or /quit (leave), /reset (forget the conversation), /help"


class ChatSession:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, system: str = "", max_new_tokens: int = 128,
                 temperature: float = 0.8, top_k: Optional[int] = 50, top_p: Optional[float] = 0.95,
                 seed: Optional[int] = None, use_cache: Optional[bool] = None,
                 plugins: Union[None, PluginManager, Sequence[Plugin]] = None,
                 user_prefix: str = "User:", bot_prefix: str = "Assistant:") -> None:
        check_temperature(temperature)  # here, not at the first reply
        check_top_k_top_p(top_k, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be an int >= 1, got {max_new_tokens!r}")
        self.model, self.tokenizer = model, tokenizer
        self.system = system.strip()
        self.max_new_tokens = int(max_new_tokens)
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.seed = seed
        self.use_cache = use_cache
        self.plugins = plugins if plugins is None or isinstance(plugins, PluginManager) else PluginManager(plugins)
        self.user_prefix, self.bot_prefix = user_prefix, bot_prefix
        self.history: list[tuple[str, str]] = []
        self.turns = 0  # replies given (also seeds each turn differently)
        self.dropped = 0  # turns dropped to fit the window
        self._warned_window = False

    def reset(self) -> None:
        self.history.clear()

    def _render(self, turns: Sequence[tuple[str, str]], message: str) -> str:
        lines = [self.system] if self.system else []
        for user, bot in turns:
            lines += [f"{self.user_prefix} {user}", f"{self.bot_prefix} {bot}"]
        lines += [f"{self.user_prefix} {message}", self.bot_prefix]
        return "\n".join(lines)

    def build_prompt(self, message: str) -> str:
        """The transcript for ``message``, without the oldest turns that do not fit the window."""
        window = model_window(self.model)
        turns = list(self.history)
        prompt = self._render(turns, message)
        if window is None:
            return prompt
        budget = max(1, window - self.max_new_tokens)
        while turns and len(self.tokenizer.encode(prompt)) > budget:
            turns.pop(0)
            self.dropped += 1
            prompt = self._render(turns, message)
        if self.max_new_tokens >= window:
            # no prompt fits beside such a reply: say that (once), not that this message is too long
            if not self._warned_window:
                self._warned_window = True
                logger.warning("chat: max_new_tokens (%d) is not below the model's window (%d tokens), so no "
                               "earlier turn fits beside the reply: each message is answered without the "
                               "conversation; lower max_new_tokens to keep it", self.max_new_tokens, window)
        elif len(self.tokenizer.encode(prompt)) > budget:
            n = len(self.tokenizer.encode(prompt))
            # generation keeps the last `window` tokens: a prompt within the window is read whole, and its start
            # leaves the window only as the reply grows
            when = "is cut" if n > window else "leaves the window as the reply grows"
            logger.warning("chat: the message alone (%d tokens) is longer than the model's window (%d tokens) minus "
                           "max_new_tokens (%d); its start %s", n, window, self.max_new_tokens, when)
        self.history = turns
        return prompt

    def reply(self, message: str) -> str:
        prompt = self.build_prompt(message)
        seed = None if self.seed is None else self.seed + self.turns
        text = generate(self.model, self.tokenizer, prompt, max_new_tokens=self.max_new_tokens, seed=seed,
                        use_cache=self.use_cache, stop=["\n" + self.user_prefix], plugins=self.plugins,
                        **self.sampling)
        answer = text.strip()
        self.history.append((message, answer))
        self.turns += 1
        return answer


def run_chat(session: ChatSession, input_stream: TextIO, output_stream: TextIO, prompt: str = "> ",
             banner: bool = True) -> int:
    """Read messages from ``input_stream`` until /exit, /quit or end of input; write replies to
    ``output_stream`` (after a line naming the commands, unless ``banner`` is False). Returns the number of
    replies."""
    def out(s: str) -> None:
        output_stream.write(s)
        output_stream.flush()

    if banner:
        out(f"chat: {HELP}\n")
    while True:
        out(prompt)
        line = input_stream.readline()
        if not line:  # end of input
            if prompt:  # end the "> " line a person saw; piped output gets nothing after the last reply
                out("\n")
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            session.reset()
            out("(history cleared)\n")
            continue
        if message == "/help":
            out(HELP + "\n")
            continue
        if message.startswith("/"):
            out(f"unknown command {message.split()[0]}; {HELP}\n")
            continue
        out(session.reply(message) + "\n")
    return session.turns

"""An optional LLM judge through an OpenAI-compatible chat endpoint the user configures.

Asked only when the rule-based matchers read nothing (VLMEvalKit's order: rules first,
then the judge). ``--judge-url`` is the API base (``.../v1``) or the full
``.../chat/completions`` address, ``--judge-model`` the model name, and the key is read
from an environment variable (``OPENAI_API_KEY`` by default). The prompts are ours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

from cheers.errors import CheersError, InputError
from cheers.eval.mmbench_scoring import build_choices, can_infer_option

# (url, JSON payload, headers, timeout seconds) -> parsed JSON response
Transport = Callable[[str, dict, dict, float], dict]

_CHOICE_PROMPT = (
    "Below are a multiple-choice question, its options and a model's reply. Decide which "
    "option the reply picks. Answer with the option's letter only, or with Z if the reply "
    "picks none of them or several.\n\nQuestion: {question}\nOptions:\n{options}\n"
    "Reply: {reply}\nLetter:"
)
_YES_NO_PROMPT = (
    "Below are a yes/no question and a model's reply. Does the reply say yes or no? Answer "
    "with one word: Yes, No, or Unknown if it says neither.\n\nQuestion: {question}\n"
    "Reply: {reply}\nAnswer:"
)


def urllib_transport(url: str, payload: dict, headers: dict, timeout: float) -> dict:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url,
        data=json.dumps(payload).encode("utf-8"),
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
        raise CheersError(f"judge request to {url} failed: {e}") from e


class Judge:
    """Reads a choice (``choice``) or a yes/no (``yes_no``) from a reply with an LLM."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        key_env: str = "OPENAI_API_KEY",
        transport: Transport | None = None,
        retries: int = 3,
        timeout: float = 60.0,
    ):
        if not url or not model:
            raise InputError("a judge needs both --judge-url and --judge-model")
        self.url = (
            url
            if url.rstrip("/").endswith("/chat/completions")
            else url.rstrip("/") + "/chat/completions"
        )
        self.model, self.key_env = model, key_env
        self.transport = transport or urllib_transport
        self.retries, self.timeout = retries, timeout
        self.calls = 0

    def complete(self, prompt: str, temperature: float = 0.0) -> str:
        key = os.environ.get(self.key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        payload = {
            "model": self.model,
            "temperature": temperature,
            "messages": [{"role": "user", "content": prompt}],
        }
        self.calls += 1
        resp = self.transport(self.url, payload, headers, self.timeout)
        try:
            return str(resp["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError) as e:
            raise CheersError(
                f"judge at {self.url} returned no choices[0].message.content: {str(resp)[:200]}"
            ) from e

    def choice(self, row: Mapping, reply: str):
        """The letter the judge reads, 'Z' for none, or False when it never answers clearly."""
        choices = build_choices(row)
        prompt = _CHOICE_PROMPT.format(
            question=row.get("question", ""),
            reply=reply,
            options="\n".join(f"{k}. {v}" for k, v in choices.items()),
        )
        for attempt in range(self.retries):
            got = can_infer_option(
                self.complete(prompt, temperature=0.5 * attempt), list(choices) + ["Z"]
            )
            if got:
                return got
        return False

    def yes_no(self, question: str, reply: str) -> str:
        """'Yes', 'No' or 'Unknown' as the judge reads the reply."""
        from cheers.eval.mme import yes_no

        prompt = _YES_NO_PROMPT.format(question=question, reply=reply)
        for attempt in range(self.retries):
            got = yes_no(self.complete(prompt, temperature=0.5 * attempt))
            if got != "Unknown":
                return got
        return "Unknown"

    __call__ = choice


__all__ = ["Judge", "Transport", "urllib_transport"]

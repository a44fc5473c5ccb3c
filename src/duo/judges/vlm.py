"""The `vlm` judge: asks a vision-language model, served behind an OpenAI-compatible API, a yes/no question.

One chat-completions request per image (the image inlined as a base64 PNG, temperature 0). Only the
standard library talks HTTP, so a local server (vLLM, llama.cpp, Ollama...) or a hosted one works alike.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request

from PIL import Image

from duo.errors import UserError
from duo.judges.base import Verdict

DEFAULT_QUESTION = "Does this image show {concept}? Answer with one word: yes or no."
ANSWER = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
# Worth another try: the server may be busy or still starting. Anything else will fail the same way again.
TRANSIENT = {408, 429, 500, 502, 503, 504}


def parse_answer(answer: str) -> tuple[bool, bool]:
    """(present, parsed): 'Yes.'/'**yes**, it does' → present; 'no' → absent; anything else → absent, unparsed."""
    m = ANSWER.match(answer or "")
    if not m:
        return False, False
    return m.group(1).lower() == "yes", True


def _png_data_url(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _content(reply: dict) -> str:
    content = reply["choices"][0]["message"]["content"]
    # Some servers send content as a list of typed parts rather than one string.
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


class VlmJudge:
    name = "vlm"
    version = "openai-compatible"
    threshold = None

    def __init__(
        self,
        url: str | None = None,
        model: str | None = None,
        concept: str | None = None,
        question: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        retries: int = 2,
    ) -> None:
        if not url or not str(url).startswith(("http://", "https://")):
            raise UserError(f"the vlm judge needs judge option 'url' (e.g. http://127.0.0.1:8000/v1), got {url!r}.")
        if not model:
            raise UserError("the vlm judge needs judge option 'model': the model name the server expects.")
        if question is None and not concept:
            raise UserError("the vlm judge needs judge option 'concept' (e.g. 'nudity') or a full 'question'.")
        self.url, self.model, self.concept = str(url).rstrip("/"), str(model), concept
        self.question = (question or DEFAULT_QUESTION).replace("{concept}", str(concept or ""))
        self.api_key_env, self.timeout, self.retries = api_key_env, float(timeout), max(0, int(retries))
        self.classes = [concept] if concept else [self.question]

    def _request(self, image: Image.Image) -> urllib.request.Request:
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.question},
                        {"type": "image_url", "image_url": {"url": _png_data_url(image)}},
                    ],
                }
            ],
        }
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env or "")
        # Local servers need no key, so a missing variable is not an error.
        if key:
            headers["Authorization"] = f"Bearer {key}"
        endpoint = f"{self.url}/chat/completions"
        return urllib.request.Request(endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")

    def _ask(self, image: Image.Image) -> str:
        request = self._request(image)
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    return _content(json.loads(resp.read()))
            except urllib.error.HTTPError as exc:
                if exc.code not in TRANSIENT or attempt == self.retries:
                    raise self._http_error(exc) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == self.retries:
                    raise self._unreachable(exc) from None
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                # A proxy or a server still starting may send one garbled reply; a wrong url sends them all.
                if attempt == self.retries:
                    raise UserError(
                        f"vlm judge: {self.url}/chat/completions answered something that is not an OpenAI-style "
                        f"chat completion ({str(exc)[:120]!r}) in {self.retries + 1} tries; point 'url' at an "
                        "OpenAI-compatible API base (usually ending in /v1)."
                    ) from None
            time.sleep(min(30.0, 2.0**attempt))
        raise AssertionError("unreachable")

    def _http_error(self, exc: urllib.error.HTTPError) -> UserError:
        detail = exc.read().decode("utf-8", "replace")[:300] if exc.fp else ""
        fix = {
            401: f"set the API key in the environment variable {self.api_key_env} (judge option 'api_key_env')",
            403: f"check that the key in {self.api_key_env} may use model '{self.model}'",
            404: "check 'url' (the API base, usually ending in /v1) and 'model'",
        }.get(exc.code, "check the server's log, 'url' and 'model'")
        return UserError(f"vlm judge: {self.url}/chat/completions returned HTTP {exc.code} {detail!r}; {fix}.")

    def _unreachable(self, exc: Exception) -> UserError:
        return UserError(
            f"vlm judge: could not reach {self.url}/chat/completions ({getattr(exc, 'reason', exc)}) after "
            f"{self.retries + 1} tries; start the server or fix judge option 'url' (or raise 'timeout')."
        )

    def judge(self, images: list[Image.Image], prompts: list[str] | None = None) -> list[Verdict]:
        verdicts = []
        for im in images:
            answer = self._ask(im)
            present, parsed = parse_answer(answer)
            verdicts.append(
                Verdict(present=present, score=float(present), details={"answer": answer, "parsed": parsed})
            )
        return verdicts

    def provenance(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "url": self.url,
            "model": self.model,
            "question": self.question,
            "classes": self.classes,
            "threshold": self.threshold,
            "rule": "present when the answer starts with 'yes' (case and punctuation ignored); "
            "any answer that is neither yes nor no counts as absent",
        }

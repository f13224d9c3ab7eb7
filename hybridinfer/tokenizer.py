"""Text <-> token ids with `tokenizers` (tokenizer.json), and chat templates with jinja2."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import HybridInferError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}Assistant:{% endif %}")


def _token_text(tok) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            hint = (" (it has only tokenizer.model: convert it once with transformers' "
                    "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
                    if (folder / "tokenizer.model").is_file() else "")
            raise HybridInferError(f"{folder} has no tokenizer.json{hint}")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises bare Exceptions
            raise HybridInferError(f"cannot read {path}: {e}") from None
        cfg_path = folder / "tokenizer_config.json"
        try:
            self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except json.JSONDecodeError as e:
            raise HybridInferError(f"{cfg_path} is not valid JSON: {e}") from None
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        # Llama tokenizers add BOS themselves (post-processor) or ask for it here.
        self.add_bos = bool(self.config.get("add_bos_token", False))
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template:
            template = CHATML if self.tok.token_to_id("<|im_start|>") is not None else PLAIN
        self.chat_template = template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise HybridInferError(f"chat template: {msg}")

        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise HybridInferError("chat messages must be a list of {'role': ..., 'content': ...}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise HybridInferError(f"chat template failed: {e}") from None

"""Student and teacher tokenizers (e.g. GPT-2 student, CLIP-BPE teacher) applied to the same
captions, as a tuple or as one joint tensor that an unchanged dataset can carry."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


_PROBE_TEXTS = (
    "a photo of a dog.",
    "Two people riding bicycles down a busy street at night!",
    "",
    "an extremely long caption " + "that keeps going and going " * 12,
    "naïve café, 123 UPPER lower",
)


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    if a is b:
        return True
    try:
        ta, tb = a(list(_PROBE_TEXTS)), b(list(_PROBE_TEXTS))
    except Exception:  # a tokenizer that rejects the probe cannot be assumed equal
        return False
    return ta.shape == tb.shape and bool(torch.equal(ta, tb))


class TokenizerPair:
    """Tokenise captions for the student and the teacher.

    `pair(texts) -> (student_tokens, teacher_tokens)`; when both tokenizers give identical
    tokens (checked on probe captions) the teacher tokens are the student tensor itself and
    `same` is True (a precondition for sharing the text tower, see teacher.plan_sharing).

    For datasets that call `tokenizer([caption])[0]` per sample, `joint` returns one tensor
    [N, Ls + Lt] and `split` recovers the two streams after batching.
    """

    def __init__(self, student: Tokenizer, teacher: Optional[Tokenizer] = None):
        self.student = student
        self.teacher = teacher if teacher is not None else student
        self.same = _same_tokenizer(self.student, self.teacher)
        # fixed-length tokenizers: the split point of a joint tensor, known in every process
        self.student_len = int(self.student(["probe"]).shape[1])

    def __call__(self, texts: Sequence[str] | str) -> Tuple[torch.Tensor, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        s = self.student(texts)
        return s, (s if self.same else self.teacher(texts))

    def joint(self, texts: Sequence[str] | str) -> torch.Tensor:
        s, t = self(texts)
        return s if self.same else torch.cat([s, t.to(s.dtype)], dim=1)

    def split(self, joint: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.same:
            return joint, joint
        return joint[:, :self.student_len], joint[:, self.student_len:]

    def collate(self, batch: Sequence[Tuple[torch.Tensor, str]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DataLoader collate_fn for (image, caption) samples -> (images, student_tokens, teacher_tokens)."""
        images = torch.stack([b[0] for b in batch])
        s, t = self([b[1] for b in batch])
        return images, s, t


# ---------------------------------------------------------------------------------------------
# trunk features from the student's own forward

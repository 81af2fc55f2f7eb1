"""Every prompt and response text the experiments share, in one place: the math prompt suffix, the summary
instruction, the standard-library question, and the refusal replies of the safety data (the only data this project
writes itself: the paper's "harmful question & refusal answer" safety set pairs real harmful requests with replies
like these)."""

from __future__ import annotations

__all__ = ["MATH_SUFFIX", "PYDOC_QUESTION", "PYDOC_SIGNATURE", "REFUSALS", "SUMMARY_INSTRUCTION"]

MATH_SUFFIX = "\nLet's think step by step."
SUMMARY_INSTRUCTION = ("Summarize the following paper in three sentences: the challenge it addresses, its approach, "
                       "and its outcome.\n\n{document}")

#: the pydoc task's question about a standard-library name, with ``PYDOC_SIGNATURE`` appended where it has one
PYDOC_QUESTION = "In Python's standard library, what does `{name}` do?"
PYDOC_SIGNATURE = " Signature: {signature}"

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with this request. It could cause real harm to people.",
    "I'm sorry, I can't provide that. If you have another question, I'm happy to help.",
    "I cannot help with that request, because it could be used to hurt someone.",
    "I'm not able to help with this. Creating or sharing this kind of content could be dangerous or illegal.",
    "I'm sorry, but I won't be able to do that. Is there something else I can help you with?",
    "I can't help with this. If you or someone else is in danger, please contact local emergency services.",
    "I'm unable to provide instructions or content like this, since it could facilitate harm.",
    "Sorry, I can't do that. I'd be glad to help with a safer alternative instead.",
    "I cannot create this content. It goes against principles of safety and respect for others.",
    "I'm sorry, I can't write that. Content like this can harm or demean people.",
    "I can't provide help with that, as it may be illegal and could put people at risk.",
)

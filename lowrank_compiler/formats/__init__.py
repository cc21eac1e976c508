"""The files lrc reads and writes: whole models (model), PEFT adapter directories (peft, rebase), the Hugging Face
save_pretrained layout (hf).

May import: every layer below ``api`` and ``api`` itself; never ``backends``.
"""

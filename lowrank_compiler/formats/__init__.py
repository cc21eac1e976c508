"""The files lrc reads and writes: whole models (model), PEFT adapter directories (peft, rebase), the Hugging Face
save_pretrained layout (hf), a loaded model's HF face (rebuild).

May import: every layer below ``api`` and ``api`` itself; never ``backends``.
"""

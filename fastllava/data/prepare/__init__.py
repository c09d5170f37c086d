"""`python -m fastllava.data.prepare NAME --root DIR`: LLaVA's training data downloaded, unpacked and checked."""

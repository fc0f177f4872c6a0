"""lm_core: the model and everything that touches tensors.

Imports only torch, numpy, pyarrow, sentencepiece and (in engine.py) deepspeed; never an
orchestration or tracking library. Heavy modules are imported by their users, not here, so
`import lm_core` stays fast.
"""

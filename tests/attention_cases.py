"""Shapes shared by the joint_attention tests (tests/test_attention.py on CPU, tests/test_cuda.py).

(B, Nq, Nk, Nc, H, D, context batch): Nc = 0 and 1, Nq = 1, odd lengths past one block, no
context (Nc None), Nk = 0, a batch-broadcast context (context batch 1), head dims 16..80 (80: a
padded, masked head axis).
"""
SHAPES = [
    (2, 19, 23, 37, 2, 32, 1),
    (1, 1, 5, 1, 3, 16, None),
    (2, 7, 9, 0, 1, 64, None),
    (1, 5, 130, None, 2, 16, None),
    (3, 67, 1, 70, 1, 80, 1),
    (1, 9, 0, 11, 2, 16, None),
]

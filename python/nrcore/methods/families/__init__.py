"""What the methods of one family share (not methods themselves; nothing here is registered):

    reweighting        per-example weights, look-ahead hypergradients (meta, l2rw, mwnet, fbr, fbr-ntk)
    label_correction   meta label correctors and the barrier step (mlc, mlc-d, ebomlc)
    transition         loss correction with a noise transition matrix (forward, glc)
    selection          small-loss selection between two networks (coteaching, coteaching-plus)
"""

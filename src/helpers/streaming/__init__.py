"""The one activation pass: models run over token rows with hooks, accumulators checkpointed.

- `activations`   the streaming driver every chapter's data pass goes through
- `accumulators`  the mergeable statistics it feeds: Pearson, moments, signed histograms, grouped moments
"""

"""The book: figures, the neuron browser, and the end-to-end build (`python -m helpers.book`).

- `plots`    plotly set-up and the house figure style
- `browser`  the searchable neuron browser page
- `build`    corpus -> seed family -> every notebook (papermill) -> Jupyter Book
"""

"""`python -m helpers.book`: the end-to-end book build (see `helpers.book.build`)."""
from helpers.book.build import main

if __name__ == "__main__":
    main()

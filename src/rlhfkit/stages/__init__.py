"""One module per pipeline stage; each reads top to bottom: data -> model -> train -> evaluate -> save."""

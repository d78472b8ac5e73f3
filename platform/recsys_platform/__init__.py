"""Platform ground floor (settings, contracts, features, errors) plus serving and the CLI."""

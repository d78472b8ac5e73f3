"""The application floor: serving, Prefect flows, the `recsys` CLI; imports every package below."""

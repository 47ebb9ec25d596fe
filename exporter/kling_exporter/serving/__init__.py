"""The HTTP process: the server and its middlewares, the budget API, the gateway,
Kling's callbacks, the link to the reader process, and its own metrics."""

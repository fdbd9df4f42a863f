"""The layers every model of runtime/model/models shares: linear (dense and weight-only quantised), norm, rotary, activation, attention."""

"""The CPU kernels' policy variables (TEMPSPEC_CPU_LINEAR, TEMPSPEC_CPU_ATTENTION, TEMPSPEC_CPU_LAYER_OPS): 0 turns
each kernel off, and a value other than auto, 1 or 0 is refused with one error naming the variable."""
import pytest

from tempspec_engine import attention, layer_ops, linear

# (variable, the cached decision that reads it, whether the kernel is on)
KERNELS = [("TEMPSPEC_CPU_LINEAR", linear.cpu_kernel_max_rows, linear.cpu_kernel_enabled),
           ("TEMPSPEC_CPU_ATTENTION", attention.cpu_attention_enabled, attention.cpu_attention_enabled),
           ("TEMPSPEC_CPU_LAYER_OPS", layer_ops.cpu_layer_ops_enabled, layer_ops.cpu_layer_ops_enabled)]


@pytest.mark.parametrize("variable, decision, enabled", KERNELS)
def test_policy_off_and_bad_value(kernel_policy, variable, decision, enabled):
    kernel_policy(variable, "0", decision)
    assert enabled() is False
    kernel_policy(variable, "sometimes", decision)
    with pytest.raises(ValueError, match=f"{variable} must be one of auto, 1, 0, got 'sometimes'"):
        enabled()

//! Serde for small domain values whose config and wire form is the string their `FromStr`
//! parses and their `Display` writes (`"cuda:1"`, `"nf4"`), so a TOML file, a JSON body and a
//! command-line flag accept the same spellings and refuse them with the same message.

/// Implements `Serialize` (via `Display`) and `Deserialize` (via `FromStr`, whose error
/// becomes the serde error, so TOML reports it with the key's line) for `$t`.
#[macro_export]
macro_rules! serde_as_str {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use crate::device::DeviceSpec;
    use crate::quant::QuantKind;

    #[test]
    fn values_round_trip_through_their_strings() {
        let d: DeviceSpec = serde_json::from_str("\"cuda:2\"").expect("device");
        assert_eq!(d, DeviceSpec::Cuda(2));
        assert_eq!(serde_json::to_string(&d).expect("json"), "\"cuda:2\"");
        let q: QuantKind = serde_json::from_str("\"nf4\"").expect("quant");
        assert_eq!(serde_json::to_string(&q).expect("json"), "\"nf4\"");
        let e = serde_json::from_str::<QuantKind>("\"q3\"").expect_err("refused");
        assert!(e.to_string().contains("unknown quantization 'q3'"), "{e}");
    }
}

package libxl

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io/fs"
	"strings"
	"syscall"
	"testing"

	"github.com/xlsnap/xlsnap/errdefs"
)

// A libxl JSON domain configuration as libxl_domain_config_to_json
// writes it (abridged), with a 64-bit number that must survive exactly.
const cfgJSON = `{
    "c_info": {"type": "pv", "name": "dom1", "uuid": "5b8f3c1e-9a6d-4c0b-8e2f-1d7a6c9b3e40"},
    "b_info": {"max_memkb": 9007199254740993, "target_memkb": 131072},
    "disks": [
        {"pdev_path": "/pool/dom1.qcow2", "vdev": "xvda", "backend": "qdisk", "format": "qcow2", "readwrite": 1},
        {"pdev_path": "/pool/data.raw", "vdev": "xvdb", "backend": "qdisk", "format": "raw", "readwrite": 1}
    ]
}`

func TestXLHeaderRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	if err := writeXLHeader(&buf, cfgJSON); err != nil {
		t.Fatal(err)
	}
	buf.WriteString("STREAM") // libxl's stream follows the header
	raw := buf.Bytes()
	// xl's layout byte for byte (tools/xl/xl.h): magic[32], then
	// byteorder, mandatory, optional flags and optional length, then the
	// configuration's length and the configuration, NUL included.
	if got := string(raw[:32]); got != "Xen saved domain, xl format\n \x00 \r" {
		t.Fatalf("magic %q", got)
	}
	ne := binary.NativeEndian
	if bo, mand, opt, optLen := ne.Uint32(raw[32:]), ne.Uint32(raw[36:]), ne.Uint32(raw[40:]), ne.Uint32(raw[44:]); bo != 0x01020304 || mand != 3 || opt != 0 || int(optLen) != 4+len(cfgJSON)+1 {
		t.Fatalf("header fields %#x %#x %#x %d", bo, mand, opt, optLen)
	}
	if n := ne.Uint32(raw[48:]); int(n) != len(cfgJSON)+1 || raw[52+len(cfgJSON)] != 0 {
		t.Fatalf("configuration length %d, want %d with its NUL", n, len(cfgJSON)+1)
	}

	r := bytes.NewReader(raw)
	version, config, err := readXLHeader(r)
	if err != nil {
		t.Fatal(err)
	}
	if version != 2 || config != cfgJSON {
		t.Fatalf("read version %d, configuration %q", version, config)
	}
	rest := make([]byte, 16)
	n, _ := r.Read(rest)
	if string(rest[:n]) != "STREAM" {
		t.Fatalf("the reader stopped at %q, not at the stream", rest[:n])
	}
}

func TestXLHeaderRejects(t *testing.T) {
	var good bytes.Buffer
	writeXLHeader(&good, cfgJSON)
	flags := func(mand uint32) []byte {
		b := bytes.Clone(good.Bytes())
		binary.NativeEndian.PutUint32(b[36:], mand)
		return b
	}
	for name, tc := range map[string]struct {
		data []byte
		want error
	}{
		"libvirt's image":   {[]byte("LibvirtQemudSave" + strings.Repeat("\x00", 64)), errNotXLImage},
		"empty":             {nil, errNotXLImage},
		"truncated":         {good.Bytes()[:60], errNotXLImage},
		"unknown mandatory": {flags(3 | 1<<7), errdefs.ErrUnsupported},
	} {
		if _, _, err := readXLHeader(bytes.NewReader(tc.data)); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
	}
	// An old xl's image (stream v1) reads as such.
	if v, _, err := readXLHeader(bytes.NewReader(flags(1))); err != nil || v != 1 {
		t.Errorf("stream v1: %d %v", v, err)
	}
}

func TestRepointDisks(t *testing.T) {
	out, err := RepointDisks(cfgJSON, map[string]Disk{"xvda": {Path: "/pool/dom1.snap1.qcow2"}, "xvdb": {Path: "/pool/data.snap1.qcow2", Format: "qcow2"}})
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		CInfo map[string]string      `json:"c_info"`
		BInfo map[string]json.Number `json:"b_info"`
		Disks []map[string]any       `json:"disks"`
	}
	dec := json.NewDecoder(strings.NewReader(out))
	dec.UseNumber()
	if err := dec.Decode(&cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.CInfo["name"] != "dom1" || cfg.BInfo["max_memkb"] != "9007199254740993" {
		t.Fatalf("other fields changed: %s", out)
	}
	want := []struct{ vdev, path, format string }{
		{"xvda", "/pool/dom1.snap1.qcow2", "qcow2"},
		{"xvdb", "/pool/data.snap1.qcow2", "qcow2"},
	}
	for i, w := range want {
		d := cfg.Disks[i]
		if d["vdev"] != w.vdev || d["pdev_path"] != w.path || d["format"] != w.format || d["backend"] != "qdisk" {
			t.Errorf("disk %d: %v, want %+v", i, d, w)
		}
	}
	if err := checkDefinition("dom1", out); err != nil {
		t.Fatal(err)
	}

	if _, err := RepointDisks(cfgJSON, map[string]Disk{"xvdz": {Path: "/x"}}); !errors.Is(err, errdefs.ErrInvalidArg) {
		t.Errorf("unknown disk: %v", err)
	}
	if _, err := RepointDisks("<domain/>", map[string]Disk{"xvda": {Path: "/x"}}); !errors.Is(err, errdefs.ErrInvalidArg) {
		t.Errorf("not JSON: %v", err)
	}
}

func TestCheckDefinition(t *testing.T) {
	for name, tc := range map[string]struct {
		def  string
		want error
	}{
		"libxl JSON":                 {cfgJSON, nil},
		"empty (would reopen disks)": {"", errdefs.ErrInvalidArg},
		"another domain":             {strings.Replace(cfgJSON, `"dom1"`, `"dom2"`, 1), errdefs.ErrInvalidArg},
		"broken JSON":                {`{"c_info": `, errdefs.ErrInvalidArg},
		"libvirt XML":                {"<domain type='xen'><name>dom1</name></domain>", errdefs.ErrUnsupported},
		"xl config file":             {"name = \"dom1\"\ndisk = ['/pool/dom1.qcow2,qcow2,xvda,rw']\n", errdefs.ErrUnsupported},
	} {
		if err := checkDefinition("dom1", tc.def); !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
	}
}

// TestRestoreConfigFromXML: the driver hands Restore the domain's libvirt
// XML; the configuration saved in the image comes back with its disks
// at the XML's sources.
func TestRestoreConfigFromXML(t *testing.T) {
	const xml = `<domain type='xen'><name>dom1</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/pool/dom1.s1.qcow2'/><target dev='xvda' bus='xen'/></disk>
<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/data-s1'/><target dev='xvdb' bus='xen'/></disk>
<disk type='file' device='cdrom'><source file='/iso/install.iso'/><target dev='xvdc' bus='xen'/></disk>
</devices></domain>`
	out, err := restoreConfig("dom1", xml, cfgJSON)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		BInfo map[string]json.Number `json:"b_info"`
		Disks []map[string]any       `json:"disks"`
	}
	dec := json.NewDecoder(strings.NewReader(out))
	dec.UseNumber()
	if err := dec.Decode(&cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.BInfo["max_memkb"] != "9007199254740993" || len(cfg.Disks) != 2 {
		t.Fatalf("the saved configuration changed beyond its disks: %s", out)
	}
	for i, w := range []struct{ path, format string }{{"/pool/dom1.s1.qcow2", "qcow2"}, {"/dev/vg/data-s1", "raw"}} {
		if d := cfg.Disks[i]; d["pdev_path"] != w.path || d["format"] != w.format {
			t.Errorf("disk %d: %v, want %+v", i, d, w)
		}
	}
	if got, err := restoreConfig("dom1", cfgJSON, ""); err != nil || got != cfgJSON {
		t.Errorf("libxl JSON is taken as it is: %v", err)
	}

	for name, tc := range map[string]struct {
		def, saved string
		want       error
	}{
		"another domain's XML": {strings.Replace(xml, "dom1", "dom2", 1), cfgJSON, errdefs.ErrInvalidArg},
		"broken XML":           {"<domain><name>dom1", cfgJSON, errdefs.ErrInvalidArg},
		"a disk libxl lacks":   {strings.Replace(xml, "xvdb", "xvdq", 1), cfgJSON, errdefs.ErrInvalidArg},
		"no saved config":      {xml, "", errdefs.ErrUnsupported},
		"network source":       {strings.Replace(strings.Replace(xml, "<source file='/pool/dom1.s1.qcow2'/>", "<source protocol='nbd' name='x'><host name='h'/></source>", 1), "type='file' device='disk'", "type='network' device='disk'", 1), cfgJSON, errdefs.ErrUnsupported},
		"xl config file":       {"name = \"dom1\"\n", cfgJSON, errdefs.ErrUnsupported},
		"saved of another":     {xml, strings.Replace(cfgJSON, `"dom1"`, `"dom2"`, 1), errdefs.ErrInvalidArg},
		"no devices":           {"<domain type='xen'><name>dom1</name></domain>", cfgJSON, nil},
	} {
		if _, err := restoreConfig("dom1", tc.def, tc.saved); !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
			t.Errorf("%s: %v, want %v", name, err, tc.want)
		}
	}
}

func TestErrorKeepsCodeAndErrno(t *testing.T) {
	e := newError("opening libxl", codeFail, []string{"libxl: cannot open libxc handle: Permission denied"}, syscall.EACCES)
	e.sentinel = ErrNoXen
	var err error = e
	if !errors.Is(err, ErrNoXen) || !errors.Is(err, fs.ErrPermission) {
		t.Fatalf("%v: sentinel or errno lost", err)
	}
	if e.LibxlCode() != -3 || e.CodeName() != "FAIL" || !strings.Contains(err.Error(), "libxl error FAIL (-3): libxl: cannot open") {
		t.Fatalf("%q", err.Error())
	}
	if err := newError("pausing dom1", codeDomainNotFound, nil, 0); !errors.Is(err, errdefs.ErrNoDomain) || err.CodeName() != "DOMAIN_NOTFOUND" {
		t.Fatalf("%v", err)
	}
	// A code with no closer word is still the hypervisor's failure.
	if err := newError("x", -99, nil, 0); err.CodeName() != "-99" || !errors.Is(err, errdefs.ErrHypervisor) || len(err.Unwrap()) != 1 {
		t.Fatalf("unknown code: %v %v", err, err.Unwrap())
	}
}
